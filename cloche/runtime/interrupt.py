"""Stopping user code that never reaches a layer boundary.

A run checks its cancellation event between layers, but a probe or a shipped function stuck in
a Python loop never gets there: the client is told "cancelled" while the server keeps burning
the model's only worker. :func:`interruptible` closes that gap. While its block runs, a watcher
waits for the cancellation event (or the deadline); if the block is still running a short grace
period later, the watcher raises :class:`UserCodeInterrupted` *inside* the executing thread, at
its next bytecode boundary (CPython's ``PyThreadState_SetAsyncExc``). The run then unwinds like
any failed run: hooks detached, transaction rolled back.

Code blocked inside a C call (a long matmul, ``time.sleep``) is interrupted when it returns to
Python. The watcher never fires after the block has exited: leaving the block disarms it under a
lock and clears an exception that was raised but not yet delivered.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from collections.abc import Iterator
from typing import Any

from cloche.errors import Cancelled

__all__ = ["GRACE_S", "UserCodeInterrupted", "interruptible"]

#: how long a cancelled run may take to reach its next layer boundary before it is interrupted
GRACE_S = 0.5

_local = threading.local()


class UserCodeInterrupted(Cancelled):
    """The request was cancelled (or timed out) while user code was running; it was stopped."""

    def __init__(self, *args: Any) -> None:
        super().__init__(args[0] if args else
                         "the request was cancelled while user code was running; it was"
                         " interrupted at its next Python bytecode (the run was rolled back)")


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc else None)


class _Watch:
    def __init__(self, thread_id: int) -> None:
        self.thread_id = thread_id
        self.lock = threading.Lock()
        self.armed = True
        self.fired = False
        self.done = threading.Event()

    def fire(self) -> None:
        with self.lock:
            if self.armed:
                self.fired = True
                _raise_in(self.thread_id, UserCodeInterrupted)

    def disarm(self) -> None:
        with self.lock:
            self.armed = False
            if self.fired:  # raised but perhaps not delivered: it must not surface later
                _raise_in(self.thread_id, None)
        self.done.set()


def _watch(watch: _Watch, cancel: Any, timeout_s: float | None, on_timeout: Any,
           grace_s: float, poll_s: float = 0.02) -> None:
    """Until the block is done: wait for the cancel or the deadline, then give it ``grace_s``."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not watch.done.wait(poll_s):
        if cancel is not None and cancel.is_set():
            break
        if deadline is not None and time.monotonic() >= deadline:
            if on_timeout is not None:
                on_timeout()  # sets the cancellation event: layer boundaries stop it cleanly
            break
    else:
        return  # the block finished first
    if not watch.done.wait(grace_s):
        watch.fire()


@contextlib.contextmanager
def interruptible(cancel: Any = None, *, timeout_s: float | None = None,
                  on_timeout: Any = None, grace_s: float = GRACE_S) -> Iterator[None]:
    """Run the block so that a cancel (or ``timeout_s``) stops it even inside user code.

    ``cancel`` is the request's event; ``on_timeout()`` is called when ``timeout_s`` passes
    first (typically it sets ``cancel``). With neither, the block runs as it is.
    """
    watched: set[int] = _local.__dict__.setdefault("watched", set())
    if (cancel is None and timeout_s is None) or (timeout_s is None and id(cancel) in watched):
        yield  # nothing to watch, or an outer block of this thread watches the same event
        return
    token = id(cancel)
    watched.add(token)
    watch = _Watch(threading.get_ident())
    watcher = threading.Thread(target=_watch, args=(watch, cancel, timeout_s, on_timeout, grace_s),
                               name="cloche-interrupt", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        watch.disarm()
        watched.discard(token)
