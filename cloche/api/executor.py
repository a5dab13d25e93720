"""The one seam between the model API and whatever runs the model.

:class:`cloche.Model` validates and assembles; an :class:`Executor` executes request records
(``cloche.api.requests``). Three implement it — ``runtime.LocalExecutor`` (this process),
``sharding.ShardedExecutor`` (rank 0 of a layer-sharded group) and ``client.RemoteExecutor``
(a ``cloche serve`` over the wire) — and the server namespaces each client's session by
wrapping an executor in another (``server.SessionExecutor``). A test checks that all of them
satisfy this Protocol, and mypy checks their signatures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn, Protocol, TypeVar, runtime_checkable

from cloche.api.futures import RequestFuture, run_in_thread
from cloche.api.requests import ModelInfo, Request
from cloche.errors import UsageError

__all__ = ["CancelEvent", "EventSink", "Executor", "dispatch", "needs_a_server", "submit_in_thread"]

T = TypeVar("T")

#: receives a request's events: ``{"type": "queued" | "started" | "progress", ...}``
EventSink = Callable[[dict[str, Any]], None]


@runtime_checkable
class CancelEvent(Protocol):
    """What a request polls to learn it was cancelled (a ``threading.Event`` is one)."""

    def is_set(self) -> bool: ...


@runtime_checkable
class Executor(Protocol):
    """Executes request records for one model."""

    def describe(self) -> ModelInfo:
        """The model's sizes, family and probe point names (cheap after the first call)."""
        ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer in this process (``None`` when the model has none)."""
        ...

    @property
    def config(self) -> Any:
        """The model's Hugging Face config in this process."""
        ...

    def execute(self, request: Request[T], *, cancel: CancelEvent | None = None,
                on_event: EventSink | None = None) -> T:
        """Carry out ``request`` and return its output; raise a ``cloche.errors`` error.

        ``cancel`` is polled between layers and batches; ``on_event`` receives progress.
        """
        ...

    def submit(self, request: Request[T], *, on_event: EventSink | None = None
               ) -> RequestFuture[T]:
        """Start ``request`` and return at once; ``future.cancel()`` stops it where it runs."""
        ...

    def close(self) -> None:
        """Release what the executor holds (connections, worker processes)."""
        ...


Handler = Callable[[Any, Any, "CancelEvent | None", "EventSink | None"], Any]


def dispatch(handlers: dict[type, Handler], owner: Any, request: Request[T],
             cancel: CancelEvent | None, on_event: EventSink | None) -> T:
    """``execute`` for an executor with a table of handlers, one per request type."""
    handler = handlers.get(type(request))
    if handler is None:
        raise UsageError(f"unknown request {type(request).__name__}")
    value: T = handler(owner, request, cancel, on_event)
    return value


def needs_a_server(*_: Any) -> NoReturn:
    """The handler an in-process executor has for requests only a server answers."""
    raise UsageError("this request needs a server (e.g. server_status()): this model runs in"
                     " this process; cloche.connect(...) gives a model on a server")


def submit_in_thread(executor: Executor, request: Request[T], on_event: EventSink | None
                     ) -> RequestFuture[T]:
    """``submit`` for an executor that runs in this process: ``execute`` on a new thread,
    cancelled through the event it polls."""
    return run_in_thread(type(request).__name__.lower(),
                         lambda cancel: executor.execute(request, cancel=cancel,
                                                         on_event=on_event))
