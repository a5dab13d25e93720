"""The model API: one facade (:class:`Model`) over one executor seam (:class:`Executor`).

``requests`` holds the request records an executor executes, ``results`` what the facade hands
back, ``handle`` the save-context handle, ``futures`` the future type of ``submit``.
"""

from cloche.api.executor import CancelEvent, EventSink, Executor
from cloche.api.futures import RequestFuture
from cloche.api.handle import SaveContextHandle
from cloche.api.model import DEFAULT_CONTEXT, Model
from cloche.api.progress import Progress
from cloche.api.results import GenerateResult, Outputs, RunResult

__all__ = ["DEFAULT_CONTEXT", "CancelEvent", "EventSink", "Executor", "GenerateResult", "Model",
           "Outputs", "Progress", "RequestFuture", "RunResult", "SaveContextHandle"]
