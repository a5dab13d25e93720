"""``cloche.Pool``: one client driving several servers at once (many checkpoints, many models).

Requests go out to every server before any result is awaited, so servers work in parallel;
results come back in the order of the addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

from cloche import errors
from cloche.api.futures import RequestFuture
from cloche.api.model import Model
from cloche.client.executor import connect

__all__ = ["Pool"]


def _per_server(value: Any, n: int, what: str) -> list[Any]:
    """One setting for every server, or a list/tuple with one per server."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise errors.UsageError(f"got {len(value)} {what} for {n} addresses")
    return list(value)


class Pool:
    """Several servers driven as one. ``token`` and ``tls`` are one setting for all servers or
    a list with one per address (``None`` tokens come from ``$CLOCHE_TOKEN``)."""

    def __init__(self, addresses: Sequence[str | tuple[str, int]], *,
                 token: str | Sequence[str | None] | None = None, tls: Any = None,
                 timeout: float = 30.0) -> None:
        if not addresses:
            raise errors.UsageError("a Pool needs at least one address")
        tokens = _per_server(token, len(addresses), "tokens")
        settings = _per_server(tls, len(addresses), "TLS settings")
        self.models: list[Model] = []
        try:
            for address, tok, tls_one in zip(addresses, tokens, settings, strict=True):
                self.models.append(connect(address, token=tok, tls=tls_one, timeout=timeout))
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.models)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[RequestFuture[Any]]:
        """``model.submit(method, ...)`` on every server."""
        return [model.submit(method, *args, **kwargs) for model in self.models]

    def apply(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every server; results in address order.

        If any fails, the others are still awaited, then the first error is raised.
        """
        return _gather(self.submit(method, *args, **kwargs))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(model, *args, **kwargs)`` on every server."""
        return self.apply("call", fn, *args, **kwargs)

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> list[Any]:
        """``fn(model, item)`` for each item, items spread round-robin over the servers."""
        futures = [
            self.models[i % len(self.models)].submit("call", fn, item)
            for i, item in enumerate(items)
        ]
        return _gather(futures)

    def close(self) -> None:
        for model in self.models:
            model.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(futures: list[RequestFuture[Any]]) -> list[Any]:
    try:
        outcomes = []
        for future in futures:
            try:
                outcomes.append((True, future.result()))
            except errors.ClocheError as exc:
                outcomes.append((False, exc))
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()
        raise
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]
