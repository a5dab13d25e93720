"""cloche: a self-hostable server and client for interpretability research.

``cloche.load(path)`` gives a model in this process, ``cloche.connect(addr)`` one on a server,
and a sharded launch one spread over many processes — all the same class, :class:`Model`.
Probes are ``fn(ctx, x)`` attached at named probe points; save contexts keep what they save
across runs; reducers compute statistics next to the data.
"""

from cloche import _version, errors
from cloche._load import load
from cloche.api import (
    GenerateResult,
    Model,
    Outputs,
    Progress,
    RequestFuture,
    RunResult,
    SaveContextHandle,
)
from cloche.client import Pool, connect
from cloche.errors import (
    AuthError,
    CallError,
    Cancelled,
    ClocheError,
    ProbeError,
    RemoteError,
    ResourceLimit,
    SessionLost,
    UnknownProbePoint,
    UsageError,
    UserCodeError,
    WorkerLost,
)
from cloche.model.points import ProbePoint
from cloche.probes import (
    Covariance,
    Histogram,
    Mean,
    MinMax,
    ProbeContext,
    Reducer,
    TensorRef,
    TopK,
    Variance,
)

__version__ = _version.__version__

from cloche import data, experiments

__all__ = [
    "AuthError", "CallError", "Cancelled", "ClocheError", "Covariance", "GenerateResult",
    "Histogram", "Mean", "MinMax", "Model", "Outputs", "Pool", "ProbeContext", "ProbeError",
    "ProbePoint", "Progress", "Reducer", "RemoteError", "RequestFuture", "ResourceLimit",
    "RunResult",
    "SaveContextHandle", "SessionLost", "TensorRef", "TopK", "UnknownProbePoint", "UsageError",
    "UserCodeError", "Variance", "WorkerLost", "connect", "data", "errors", "experiments", "load",
]
