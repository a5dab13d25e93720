"""The control plane: heartbeats, liveness, the per-command abort flag, and bounded waits.

Every rank bumps a heartbeat counter in the store every ``heartbeat_s``; a rank whose counter has
not moved for ``timeout_s`` is lost. Every wait on the store is cut into short slices; between
slices the waiter checks liveness (raising :class:`~cloche.errors.WorkerLost` naming the rank)
and, for abortable waits, the command's abort flag. That is how a cancel, or a failure on one
rank, reaches ranks that are blocked waiting for data: nobody is ever blocked in an operation
that cannot notice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch.distributed as tdist

from cloche.errors import Aborted, Cancelled, WorkerLost

__all__ = ["Aborted", "Control", "Liveness"]

_SLICE_S = 0.05
_LIVENESS_EVERY_S = 0.2
#: what ``compare_set(key, _ABSENT, _ABSENT)`` answers for a missing key (and leaves it missing);
#: for a present key it answers the value: one round trip where ``check`` + ``get`` took two
_ABSENT = "\0cloche: no such key\0"
_ABSENT_BYTES = _ABSENT.encode()


class Liveness:
    """Tracks every other rank's heartbeat counter; ``check`` raises for a lost rank."""

    def __init__(self, store: tdist.Store, rank: int, world_size: int, timeout_s: float,
                 local_check: Callable[[], dict[int, int | None]] | None = None) -> None:
        self._store = store
        self._rank = rank
        self._others = [r for r in range(world_size) if r != rank]
        self._timeout = timeout_s
        self._seen: dict[int, tuple[str, float]] = {}
        self._local_check = local_check
        self._lock = threading.Lock()
        self.lost: WorkerLost | None = None

    def check(self) -> None:
        with self._lock:
            if self.lost is not None:
                raise self.lost
            if self._local_check is not None:
                for rank, code in self._local_check().items():
                    self.lost = WorkerLost(f"rank {rank} died (exit code {code})", rank=rank)
                    raise self.lost
            now = time.monotonic()
            try:
                values = self._store.multi_get([f"hb/{r}" for r in self._others])
            except RuntimeError as exc:
                self.lost = WorkerLost(f"the control store is gone (rank 0 died?): {exc}",
                                       rank=0)
                raise self.lost from exc
            for rank, raw in zip(self._others, values, strict=True):
                value = bytes(raw).decode()
                last = self._seen.get(rank)
                if last is None or last[0] != value:
                    self._seen[rank] = (value, now)
                elif now - last[1] > self._timeout:
                    self.lost = WorkerLost(
                        f"rank {rank} stopped answering (no heartbeat for {now - last[1]:.1f} s;"
                        f" the bound is {self._timeout:g} s)", rank=rank)
                    raise self.lost


class Control:
    """One rank's control-plane state: the current command's abort flag and its waits."""

    def __init__(self, store: tdist.Store, poll_store: tdist.Store | None, rank: int,
                 world_size: int, timeout_s: float, heartbeat_s: float,
                 local_check: Callable[[], dict[int, int | None]] | None = None) -> None:
        """``poll_store`` None: no heartbeat/abort thread (a second Control for another thread
        of the same rank, which shares the first one's heartbeat)."""
        self.store = store
        self.rank = rank
        self.liveness = Liveness(store, rank, world_size, timeout_s, local_check)
        self.abort_event = threading.Event()
        self.abort_origin: int | None = None
        self.cancel: object | None = None  # the client's cancel event (rank 0 only)
        self._poll_store = poll_store if poll_store is not None else store
        self._poll_liveness = Liveness(self._poll_store, rank, world_size, timeout_s,
                                       local_check)
        self._command: int | None = None
        self._heartbeat_s = heartbeat_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.on_lost: Callable[[WorkerLost], None] | None = None
        self.watch_idle = False
        self.closing = threading.Event()  # set: waits give up (the thread is shutting down)
        self._thread = threading.Thread(target=self._poll_loop, name=f"cloche-control-{rank}",
                                        daemon=True)
        if poll_store is not None:
            self._thread.start()

    # ----------------------------------------------------------------- per command
    def begin(self, command: int, cancel: object | None = None) -> None:
        with self._lock:
            self.abort_event.clear()
            self.abort_origin = None
            self.cancel = cancel
            self._command = command

    def end(self) -> None:
        with self._lock:
            self._command = None
            self.cancel = None

    def abort(self, command: int, reason: str) -> None:
        """Raise the abort flag of ``command`` for every rank (first writer wins)."""
        key = f"abort/{command}"
        try:
            self.store.compare_set(key, "", f"{self.rank}:{reason}")
        except (RuntimeError, tdist.DistStoreError):
            return  # the store is gone: liveness reports the real problem
        if self.abort_origin is None:
            self.abort_origin = self.rank
        self.abort_event.set()

    def _read_abort(self, store: tdist.Store, command: int) -> None:
        raw = bytes(store.compare_set(f"abort/{command}", _ABSENT, _ABSENT))
        if raw != _ABSENT_BYTES:
            value = raw.decode()
            origin = value.split(":", 1)[0]
            if self.abort_origin is None and origin.isdigit():
                self.abort_origin = int(origin)
            self.abort_event.set()

    # ----------------------------------------------------------------- waits
    def wait(self, key: str, *, command: int | None = None, abortable: bool = True) -> bytes:
        """The value of ``key`` once it exists; checks liveness (and the abort flag) meanwhile.

        Polls with one quick request (that reads the value if it is there) and a sleep that
        grows from 0.1 ms to 10 ms, so a message that is already there costs one round trip and
        a long wait costs little.
        """
        delay = 1e-4
        next_check = time.monotonic() + _LIVENESS_EVERY_S
        while True:
            try:
                value = bytes(self.store.compare_set(key, _ABSENT, _ABSENT))
                if value != _ABSENT_BYTES:
                    return value
            except RuntimeError as exc:
                self.liveness.check()
                raise WorkerLost(f"the control store failed (rank 0 died?): {exc}",
                                 rank=0) from exc
            now = time.monotonic()
            slow = now >= next_check
            if slow:
                next_check = now + _LIVENESS_EVERY_S
            self.between_slices(key, command=command, abortable=abortable, slow=slow)
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def between_slices(self, what: str, *, command: int | None, abortable: bool,
                       slow: bool) -> None:
        """What every wait checks between two slices: raises when the wait must end.

        Always: the command's abort flag (abortable waits) and shutdown; ``slow`` (every
        0.2 s or so): the abort flag in the store and every rank's liveness too.
        """
        if abortable and command is not None and self.abort_event.is_set():
            self._raise_aborted(command)
        if self.closing.is_set():
            raise Aborted(f"stopped waiting for {what}: shutting down")
        if slow:
            if abortable and command is not None:
                self._read_abort(self.store, command)
                if self.abort_event.is_set():
                    self._raise_aborted(command)
            self.liveness.check()

    def _raise_aborted(self, command: int) -> None:
        if self.abort_origin == self.rank:
            raise Cancelled("the request was cancelled")
        raise Aborted(f"command {command} was aborted by rank {self.abort_origin}")

    # ----------------------------------------------------------------- the poller
    def _poll_loop(self) -> None:
        next_beat = 0.0
        beats = 0
        while not self._stop.wait(_SLICE_S):
            now = time.monotonic()
            try:
                if now >= next_beat:
                    beats += 1
                    self._poll_store.set(f"hb/{self.rank}", str(beats))
                    next_beat = now + self._heartbeat_s
                    if self.watch_idle:
                        self._poll_liveness.check()
                with self._lock:
                    command, cancel = self._command, self.cancel
                if command is not None:
                    if cancel is not None and getattr(cancel, "is_set", lambda: False)() \
                            and not self.abort_event.is_set():
                        self._poll_store.compare_set(f"abort/{command}", "",
                                                     f"{self.rank}:cancelled")
                        self.abort_origin = self.rank
                        self.abort_event.set()
                    self._read_abort(self._poll_store, command)
            except WorkerLost as exc:
                self.liveness.lost = exc
                self.abort_event.set()
                if self.on_lost is not None:
                    self.on_lost(exc)
                return
            except (RuntimeError, tdist.DistStoreError) as exc:
                lost = WorkerLost(f"the control store is gone (rank 0 died?): {exc}", rank=0)
                self.liveness.lost = lost
                self.abort_event.set()
                if self.on_lost is not None:
                    self.on_lost(lost)
                return

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
