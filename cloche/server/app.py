"""The server: accept connections, queue model work fairly, run it on one worker thread.

Threads: one accepting connections, one per connection (handshake, then reading requests and
answering light ones), one worker executing heavy requests on the model one at a time (the
model is not safe to run concurrently: probes are hooks on shared modules), and one janitor
expiring idle sessions. ``Server`` talks to its model only through the executor seam
(``cloche.api.executor``), so the same class serves a local or a sharded model.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

from cloche import errors
from cloche.api import requests as rq
from cloche.api.executor import EventSink, Executor
from cloche.api.model import Model
from cloche.api.progress import silenced
from cloche.runtime.interrupt import paused
from cloche.server.config import ServerConfig, is_loopback
from cloche.server.connection import Job, ServerConnection
from cloche.server.fairqueue import FairQueue
from cloche.server.guard import AdmissionGuard
from cloche.server.session_executor import SessionExecutor
from cloche.server.sessions import Session, SessionRegistry
from cloche.wire import transport
from cloche.wire.handshake import ServerHandshake

__all__ = ["Server"]

log = logging.getLogger("cloche.server")


def throttled(emit: EventSink, interval: float) -> EventSink:
    """``emit`` for progress events at most every ``interval`` seconds (and always the last)."""
    last = [0.0]

    def report(event: dict[str, Any]) -> None:
        if event.get("type") == "progress":
            now = time.monotonic()
            if now - last[0] < interval and event.get("done") != event.get("total"):
                return
            last[0] = now
        emit(event)

    return report


class Server:
    """Serve a model (a :class:`cloche.Model`, or any executor) as configured.

    ``start()`` returns once it is listening.
    """

    def __init__(self, model: Model | Executor, config: ServerConfig) -> None:
        self.executor: Executor = model.executor if isinstance(model, Model) else model
        self.config = config
        self._principals = {p.name: p for p in config.principals}
        self.sessions = SessionRegistry(
            config.session_idle_expiry,
            None if config.state_dir is None else Path(config.state_dir) / "sessions.json")
        self.queue: FairQueue[Job] = FairQueue()
        self.info: dict[str, Any] = {}
        self.model_info: rq.ModelInfo | None = None
        self._ssl = (
            transport.server_ssl_context(config.tls_cert, config.tls_key)
            if config.tls_cert else None
        )
        self.guard = AdmissionGuard(
            per_address=config.max_unauthenticated_per_address,
            total=config.max_unauthenticated, failure_limit=config.auth_failure_limit,
            backoff=config.auth_backoff, backoff_max=config.auth_backoff_max)
        self._listener: socket.socket | None = None
        self._connections: set[ServerConnection] = set()
        self._conn_lock = threading.Lock()
        self._positions_lock = threading.Lock()
        self._running: Job | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = time.monotonic()

    # ----------------------------------------------------------------- lifecycle
    @property
    def address(self) -> tuple[str, int]:
        if self._listener is None:
            raise errors.UsageError("the server is not listening yet")
        host, port = self._listener.getsockname()[:2]
        return host, port

    def start(self) -> tuple[str, int]:
        # Probe-point shapes are discovered with a forward pass: do it now, before any client
        # can ask for them concurrently with a run.
        self.executor.execute(rq.ProbePoints())
        self.model_info = self.executor.describe()  # what requests are checked against
        self.info = self.model_info.summary()
        if self.config.max_saved_bytes is not None:  # every session's context is under p/
            self.executor.execute(rq.Quota(
                prefix="p/", max_bytes=self.config.max_saved_bytes,
                label="the server (--max-saved-bytes, ServerConfig.max_saved_bytes)"))
        for principal in self.config.principals:
            if principal.max_saved_bytes is not None:
                self.executor.execute(rq.Quota(
                    prefix=Session.root_of(principal.name), max_bytes=principal.max_saved_bytes,
                    label=f"principal {principal.name!r} (max-saved-bytes in the token file)"))
        self._listener = transport.listen(self.config.host, self.config.port)
        if self._ssl is None and not is_loopback(self.config.host):
            log.warning("serving on %s without TLS (insecure_no_tls): frames after the"
                        " handshake are not protected", self.config.host)
        for target, name in (
            (self._accept_loop, "cloche-accept"),
            (self._work_loop, "cloche-worker"),
            (self._janitor_loop, "cloche-janitor"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.address

    def wait(self, timeout: float | None = None) -> bool:
        """Block until :meth:`shutdown` (True) or the timeout (False)."""
        return self._stop.wait(timeout)

    def shutdown(self) -> None:
        """Stop accepting, cancel all work, close every connection."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept()
            except OSError:
                pass  # not connected in the TCP sense on some platforms; close() still works
            self._listener.close()
        for job in self.queue.close():
            job.cancel.set()
        running = self._running
        if running is not None:
            running.cancel.set()
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            conn.framed.abort()  # each connection's thread then cleans up and closes
        for thread in self._threads:
            thread.join(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- connections
    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stop.is_set():
            try:
                sock, addr = self._listener.accept()
            except OSError:
                if self._stop.is_set():
                    return
                continue
            host = addr[0]
            peer = f"{host}:{addr[1]}"
            with self._conn_lock:
                full = len(self._connections) >= self.config.max_connections
            if full:
                log.warning("refused %s: %d connections already open", peer, len(self._connections))
                self._turn_away(sock, "busy", "the server has too many connections")
                continue
            conn = ServerConnection(self, sock, peer, host, ssl_context=self._ssl)
            refusal = self.guard.admit(host, conn)
            if refusal is not None:
                log.debug("refused %s: %s", peer, refusal.reason)
                self._turn_away(sock, refusal.code, refusal.reason)
                continue
            transport.accepted(sock)
            with self._conn_lock:
                self._connections.add(conn)
            threading.Thread(target=conn.serve, name=f"cloche-conn-{peer}", daemon=True).start()

    def _turn_away(self, sock: socket.socket, code: str, reason: str) -> None:
        # A TLS client could not read a plain refusal: it just sees the connection close.
        message = None if self._ssl is not None else ServerHandshake.refusal(reason, code)
        transport.turn_away(sock, message)

    def forget(self, conn: ServerConnection) -> None:
        with self._conn_lock:
            self._connections.discard(conn)

    @property
    def connection_count(self) -> int:
        with self._conn_lock:
            return len(self._connections)

    # ----------------------------------------------------------------- the queue
    def enqueue(self, job: Job) -> None:
        self.sessions.acquire(job.session)
        principal = self._principals.get(job.session.principal)
        self.queue.put(job.session.id, job, group=job.session.principal,
                       weight=principal.share if principal is not None else 1)
        self._announce_positions()

    def cancel_job(self, job: Job) -> None:
        job.cancel.set()
        if self.queue.remove(job.session.id, job):
            self._complete(job, error=errors.Cancelled("cancelled while queued",
                                                       request_id=job.request.id))
            self._announce_positions()

    def _announce_positions(self) -> None:
        """Tell every waiting job its place: ``position`` in line (1: next) and ``ahead``, the
        requests that run before it (the running one included)."""
        with self._positions_lock:
            for job, position, ahead in self._places():
                if job.position != position:
                    job.position = position
                    job.emit({"type": "queued", "position": position, "ahead": ahead})

    def _places(self) -> list[tuple[Job, int, int]]:
        """Every waiting job, its place in line (1: next) and how many requests run before it
        (the running one included)."""
        running = int(self._running is not None)
        return [(job, position, position - 1 + running)
                for job, position in self.queue.positions()]

    def _complete(self, job: Job, *, value: Any = None, error: BaseException | None = None) -> None:
        if job.finished:
            return
        job.finished = True
        try:
            if error is None:
                job.conn.send_result(job.request.id, value)
            else:
                job.conn.send_error(job.request.id, error)
        finally:
            job.conn.finish(job)
            self.sessions.release(job.session)

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            job = self.queue.get()
            if job is None:
                return
            self._run_job(job)

    def _run_job(self, job: Job) -> None:
        """Execute one heavy request on this (the worker) thread and answer it."""
        if job.cancel.is_set():
            self._announce_positions()
            self._complete(job, error=errors.Cancelled("cancelled while queued",
                                                       request_id=job.request.id))
            return
        outer, self._running = self._running, job
        job.started = time.monotonic()
        self._announce_positions()  # the others moved up, behind this one
        timer = self._start_deadline(job)
        outcome: dict[str, Any] = {}
        try:
            job.emit({"type": "started"})
            executor = SessionExecutor(self.executor, job.session, job.cancel)
            on_event = throttled(job.emit, self.config.progress_interval)
            if isinstance(job.op, rq.RunDataset) and self.info.get("world_size") == 1:
                # (the ranks of a sharded model are inside one command for the whole run)
                on_event = self._yielding(job, on_event)
            with silenced():  # the server's console is not the user's: no bars in user code
                value = executor.execute(job.op, cancel=job.cancel, on_event=on_event)
        except Exception as exc:  # noqa: BLE001 - any failure is the client's answer
            if job.timed_out and isinstance(exc, errors.Cancelled):
                exc = errors.Cancelled(
                    f"the request ran longer than the server's --request-timeout"
                    f" ({self.config.request_timeout:g} s) and was stopped (rolled back)",
                    request_id=job.request.id)
            outcome = {"error": exc}
        else:
            outcome = {"value": value}
        finally:
            if timer is not None:
                timer.cancel()
            self._running = outer
        # answered once the worker is free: the client's next request, which may arrive
        # before this method returns, then finds nothing running ahead of it
        self._complete(job, **outcome)

    def _yielding(self, job: Job, emit: EventSink) -> EventSink:
        """Between two batches of ``job`` (a dataset run), serve what other sessions wait for.

        A long dataset run is one transaction, but between its batches no probe is attached,
        so the model can answer another session's request and go on: that request waits for
        at most one batch, not for the whole run. Other dataset runs keep their place in line.
        """

        def on_event(event: dict[str, Any]) -> None:
            emit(event)
            if event.get("type") != "progress":
                return
            waiting = self.queue.take_each_other(
                job.session.id, lambda other: not isinstance(other.op, rq.RunDataset))
            if waiting:
                with paused():  # this run's cancel must not land in the other requests' code
                    for other in waiting:
                        self._run_job(other)

        return on_event

    def _start_deadline(self, job: Job) -> threading.Timer | None:
        """Cancel ``job`` when it outlives ``request_timeout`` (user code stuck in a loop is
        then interrupted too: see ``runtime.interrupt``)."""
        if self.config.request_timeout is None:
            return None

        def expire() -> None:
            job.timed_out = True
            job.cancel.set()

        timer = threading.Timer(self.config.request_timeout, expire)
        timer.daemon = True
        timer.start()
        return timer

    # ----------------------------------------------------------------- status
    def status(self, session: Session) -> dict[str, Any]:
        """The server's state as ``session`` may see it (``model.server_status()``,
        ``cloche status``): its own requests are named, other principals' only counted."""

        def entry(job: Job) -> dict[str, Any]:
            same = job.session.principal == session.principal
            return {"request": type(job.op).__name__ if same else None,
                    "yours": job.session is session,
                    "session": job.session.id[:8] if same else None}

        running = self._running
        now = time.monotonic()
        queue = [{**entry(job), "position": position, "ahead": ahead}
                 for job, position, ahead in self._places()]
        return {
            "model": self.info.get("name"), "world_size": self.info.get("world_size"),
            "principal": session.principal, "session": session.id,
            "uptime_s": round(now - self._started, 1),
            "running": None if running is None else {
                **entry(running),
                "seconds": round(now - (running.started or now), 3)},
            "queue": queue,
            "sessions": self.sessions.count(), "your_sessions": self.sessions.count(
                session.principal),
            "connections": self.connection_count,
            "memory": _memory(),
        }

    # ----------------------------------------------------------------- sessions
    def _janitor_loop(self) -> None:
        expiry = self.config.session_idle_expiry
        if expiry is None:
            return
        interval = min(max(expiry / 4, 0.05), 30.0)
        while not self._stop.wait(interval):
            try:
                for sid in self.sessions.expire(self._drop_session):
                    log.info("session %s expired after %.0f s idle", sid, expiry)
            except Exception:
                log.exception("expiring sessions failed")

    def _drop_session(self, session: Session) -> None:
        SessionExecutor(self.executor, session).drop_all()


def _memory() -> dict[str, int | None]:
    """The server process's resident and peak memory in bytes (None where the OS cannot say)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    rss = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return {"rss_bytes": rss, "peak_rss_bytes": peak}
