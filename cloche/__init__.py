"""cloche: a self-hostable server and client for interpretability research.

``cloche.load(path)`` gives a local model; ``cloche.connect(addr)`` a remote one with the same
API. Probes are ``fn(ctx, x)`` attached at named probe points; save contexts keep what they
save across runs; reducers compute statistics next to the data.
"""

from cloche import errors
from cloche._load import load
from cloche.client import Pool, RemoteFuture, RemoteModel, RemoteSaveContext, connect
from cloche.errors import (
    AuthError,
    Cancelled,
    ClocheError,
    ProbeError,
    RemoteError,
    ResourceLimit,
    UnknownProbePoint,
    UsageError,
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
    SaveContextHandle,
    TensorRef,
    TopK,
    Variance,
)
from cloche.runtime import GenerateResult, Model, Outputs, RunResult

__version__ = "0.1.0"

from cloche import data, experiments

__all__ = [
    "AuthError", "Cancelled", "ClocheError", "Covariance", "GenerateResult", "Histogram",
    "Mean", "MinMax", "Model", "Outputs", "Pool", "ProbeContext", "ProbeError", "ProbePoint",
    "Reducer", "RemoteError", "RemoteFuture", "RemoteModel", "RemoteSaveContext",
    "ResourceLimit", "RunResult", "SaveContextHandle", "TensorRef", "TopK", "UnknownProbePoint",
    "UsageError", "Variance", "WorkerLost", "connect", "data", "errors", "experiments", "load",
]
