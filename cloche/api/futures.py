"""One future type for every executor: ``cancel()`` stops the work where it runs.

A :class:`RequestFuture` is a ``concurrent.futures.Future`` whose ``cancel()`` also reaches the
work — a running request included — through a callback (a cancel message to the server, or the
event a local run polls between layers). ``then`` maps the result without blocking, which is
how the facade turns an executor's raw output into the user's result type.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cloche.errors import Cancelled

__all__ = ["RequestFuture", "run_in_thread", "wait"]

T = TypeVar("T")
U = TypeVar("U")


class RequestFuture(concurrent.futures.Future[T]):
    """A request in flight. Unlike a plain future, a *running* request can be cancelled."""

    def __init__(self, method: str, *, on_cancel: Callable[[], object] | None = None,
                 request_id: int | None = None) -> None:
        super().__init__()
        self.method = method
        self.request_id = request_id
        self._on_cancel = on_cancel

    def cancel(self) -> bool:
        # Mark the future cancelled *before* telling the work: the answer to the cancel (the
        # server's "cancelled while queued", a local run stopping) can otherwise arrive on
        # another thread between the two steps and make ``cancel()`` report False for a request
        # that this very call stopped.
        if not super().cancel():
            return False
        if self._on_cancel is not None:
            self._on_cancel()
        return True

    def then(self, fn: Callable[[T], U]) -> RequestFuture[U]:
        """A future of ``fn(result)``; cancelling it cancels this one."""
        mapped: RequestFuture[U] = RequestFuture(self.method, on_cancel=self.cancel,
                                                 request_id=self.request_id)

        def transfer(done: concurrent.futures.Future[T]) -> None:
            if mapped.done():
                return
            try:
                if done.cancelled():
                    mapped.cancel()
                    return
                exc = done.exception()
                if exc is not None:
                    mapped.set_exception(exc)
                else:
                    mapped.set_result(fn(done.result()))
            except concurrent.futures.InvalidStateError:
                pass  # cancelled meanwhile
            except Exception as exc:  # noqa: BLE001 - the mapping failed: that is the outcome
                try:
                    mapped.set_exception(exc)
                except concurrent.futures.InvalidStateError:
                    pass  # cancelled meanwhile

        self.add_done_callback(transfer)
        return mapped

    def __repr__(self) -> str:
        rid = f" #{self.request_id}" if self.request_id is not None else ""
        return f"<RequestFuture {self.method}{rid} {self._state.lower()}>"


def run_in_thread(method: str, work: Callable[[threading.Event], T]) -> RequestFuture[T]:
    """Start ``work(cancel_event)`` on a new thread; the future's ``cancel()`` sets the event."""
    cancel = threading.Event()
    future: RequestFuture[T] = RequestFuture(method, on_cancel=cancel.set)

    def target() -> None:
        try:
            value = work(cancel)
        except BaseException as exc:  # noqa: BLE001 - delivered to whoever waits on the future
            outcome: tuple[bool, Any] = (False, exc)
        else:
            outcome = (True, value)
        try:
            if outcome[0]:
                future.set_result(outcome[1])
            else:
                future.set_exception(outcome[1])
        except concurrent.futures.InvalidStateError:
            pass  # cancelled: nobody waits for the outcome

    threading.Thread(target=target, name=f"cloche-{method}", daemon=True).start()
    return future


def wait(future: RequestFuture[T], cancel: Any = None, *, poll_s: float = 0.05) -> T:
    """``future.result()``, cancelling the request on Ctrl-C or when ``cancel`` is set.

    An event already set when the wait begins cancels the request even if its answer would come
    within the first poll: as in a local run, which checks the event before its first batch."""
    try:
        if cancel is None:
            return future.result()
        if cancel.is_set():
            future.cancel()
            raise Cancelled("the request was cancelled", request_id=future.request_id)
        while True:
            try:
                return future.result(timeout=poll_s)
            except concurrent.futures.TimeoutError:
                if cancel.is_set():
                    future.cancel()
                    raise Cancelled("the request was cancelled",
                                    request_id=future.request_id) from None
    except KeyboardInterrupt:
        future.cancel()
        raise
    except concurrent.futures.CancelledError:
        raise Cancelled("the request was cancelled", request_id=future.request_id) from None
