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
from typing import Any, Protocol, TypeVar, runtime_checkable

from cloche.api.futures import RequestFuture
from cloche.api.requests import ModelInfo, Request

__all__ = ["CancelEvent", "EventSink", "Executor"]

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
