"""Stopping user code that never reaches a layer boundary.

A run checks its cancellation event between layers, but a probe or a shipped function stuck in
a Python loop never gets there: the client is told "cancelled" while the server keeps burning
the model's only worker. :func:`interruptible` closes that gap. While its block runs, one
watchdog thread (shared by every block of the process) watches the block's cancellation event
(and deadline); if the block is still running a short grace period after the cancel, the
watchdog raises :class:`UserCodeInterrupted` *inside* the executing thread, at its next
bytecode boundary (CPython's ``PyThreadState_SetAsyncExc``). The run then unwinds like any
failed run: hooks detached, transaction rolled back.

Three hazards, and what guards them:

- *Late delivery.* The exception must never surface after the block: leaving the block
  disarms its watch under a lock and clears an exception raised but not yet delivered.
- *A thread being started.* A new thread's state carries its creator's id until it runs, and
  ``SetAsyncExc`` would hit that thread instead (it then dies before signalling that it started,
  and its creator waits in ``Thread.start()`` forever). So the watchdog fires only while no
  ``threading.Thread`` is starting (``threading._limbo`` empty, checked under the lock that
  guards it), and starts no thread of its own per block.
- *Nested work.* A server serves other sessions' requests between two batches of a long dataset
  run, on the same thread: :func:`paused` suspends the enclosing blocks' watches meanwhile, so
  one request's cancel never lands in another's code.

Code blocked inside a C call (a long matmul, ``time.sleep``) is interrupted when it returns to
Python.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from typing import Any

from cloche.errors import Cancelled

__all__ = ["GRACE_S", "UserCodeInterrupted", "interruptible", "paused"]

#: how long a cancelled run may take to reach its next layer boundary before it is interrupted
GRACE_S = 0.5
_POLL_S = 0.02
#: how long the watchdog keeps polling after its last block ended before it sleeps until the
#: next one: back-to-back requests (a loop of short runs) then do not wake it one by one
_LINGER_S = 0.5


class UserCodeInterrupted(Cancelled):
    """The request was cancelled (or timed out) while user code was running; it was stopped."""

    def __init__(self, *args: Any) -> None:
        super().__init__(args[0] if args else
                         "the request was cancelled while user code was running; it was"
                         " interrupted at its next Python bytecode (the run was rolled back)")


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> int:
    result: int = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc else None)
    return result


class _Watch:
    """One block: its thread, what it waits for, and whether it may still be interrupted."""

    def __init__(self, thread_id: int, cancel: Any, timeout_s: float | None, on_timeout: Any,
                 grace_s: float) -> None:
        self.thread_id = thread_id
        self.cancel = cancel
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.on_timeout = on_timeout
        self.grace_s = grace_s
        self.armed = True
        self.paused = 0
        self.fire_at: float | None = None  # once cancelled: when the grace period is over
        self.fired = False

    def step(self, now: float) -> None:
        """Called by the watchdog under the registry lock: fire if due."""
        if not self.armed or self.fired:
            return
        if self.fire_at is None:
            if self.cancel is not None and self.cancel.is_set():
                self.fire_at = now + self.grace_s
            elif self.deadline is not None and now >= self.deadline:
                if self.on_timeout is not None:
                    self.on_timeout()  # sets the cancel: layer boundaries stop it cleanly
                self.fire_at = now + self.grace_s
            return
        if self.paused or now < self.fire_at:
            return
        # a thread being started would carry this thread's id and take the exception instead
        with threading._active_limbo_lock:  # type: ignore[attr-defined]  # CPython internals
            if threading._limbo:  # type: ignore[attr-defined]
                return  # try again at the next poll
            if _raise_in(self.thread_id, UserCodeInterrupted):
                self.fired = True


class _Watchdog:
    """The one thread that watches every active block (started on first use)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.watches: set[_Watch] = set()
        self.wake = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None
        self.asleep = False  # waiting for a block without a timeout: add() must wake it

    def add(self, watch: _Watch) -> None:
        with self.lock:
            self.watches.add(watch)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="cloche-interrupt",
                                               daemon=True)
                self.thread.start()
            if self.asleep:  # else it polls anyway: waking it per block costs a thread switch
                self.wake.notify()

    def remove(self, watch: _Watch) -> None:
        """Disarm ``watch``: after this, nothing is raised for it (and nothing pending stays)."""
        with self.lock:
            watch.armed = False
            self.watches.discard(watch)
            if watch.fired:  # raised but perhaps not delivered: it must not surface later
                _raise_in(watch.thread_id, None)

    def _run(self) -> None:
        with self.lock:
            idle_since: float | None = None
            while True:
                now = time.monotonic()
                if self.watches:
                    idle_since = None
                    for watch in list(self.watches):
                        watch.step(now)
                elif idle_since is None:
                    idle_since = now
                elif now - idle_since >= _LINGER_S:
                    self.asleep = True
                    self.wake.wait()
                    self.asleep = False
                    idle_since = None
                    continue
                self.wake.wait(_POLL_S)


_watchdog = _Watchdog()
_local = threading.local()


def _stack() -> list[_Watch]:
    stack: list[_Watch] = _local.__dict__.setdefault("stack", [])
    return stack


@contextlib.contextmanager
def interruptible(cancel: Any = None, *, timeout_s: float | None = None,
                  on_timeout: Any = None, grace_s: float = GRACE_S) -> Iterator[None]:
    """Run the block so that a cancel (or ``timeout_s``) stops it even inside user code.

    ``cancel`` is the request's event; ``on_timeout()`` is called when ``timeout_s`` passes
    first (typically it sets ``cancel``). With neither, or when an enclosing block of this
    thread already watches the same event, the block runs as it is.
    """
    stack = _stack()
    if (cancel is None and timeout_s is None) or (
            timeout_s is None and any(w.cancel is cancel for w in stack)):
        yield
        return
    watch = _Watch(threading.get_ident(), cancel, timeout_s, on_timeout, grace_s)
    stack.append(watch)
    _watchdog.add(watch)
    try:
        yield
    finally:
        _watchdog.remove(watch)
        stack.remove(watch)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """Suspend the watches of this thread's enclosing blocks (for nested, unrelated work).

    A cancel that arrives meanwhile still counts: its grace period starts again on resume.
    """
    stack = list(_stack())
    with _watchdog.lock:
        for watch in stack:
            watch.paused += 1
    try:
        yield
    finally:
        now = time.monotonic()
        with _watchdog.lock:
            for watch in stack:
                watch.paused -= 1
                if watch.fire_at is not None:
                    watch.fire_at = max(watch.fire_at, now + watch.grace_s)
