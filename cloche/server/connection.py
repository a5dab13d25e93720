"""One client connection on the server: handshake, then requests until the peer leaves.

Nothing from the peer is unpickled until it has proven it knows the token; before that, frames
are limited to 4 KiB and must be one of the handshake messages. A frame that breaks the
protocol closes the connection (the byte stream can no longer be trusted); a request that fails
is answered with an error and the connection goes on. When the connection drops, its queued and
running requests are cancelled; its session stays for a reconnect.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from cloche import errors
from cloche.api import requests as rq
from cloche.errors.payload import to_payload
from cloche.server.principals import OWNER
from cloche.server.session_executor import SessionExecutor
from cloche.server.sessions import Session
from cloche.wire import codec, frames, messages, shm
from cloche.wire.frames import Limits
from cloche.wire.handshake import ServerHandshake, code_skew, local_versions
from cloche.wire.transport import FramedSocket

if TYPE_CHECKING:
    from cloche.server.app import Server

__all__ = ["Job", "ServerConnection"]

log = logging.getLogger("cloche.server")


def _size(encoded: codec.Encoded | bytes) -> int:
    if isinstance(encoded, bytes):  # the rest of a frame that went out in part
        return len(encoded)
    return len(encoded.header) + encoded.body_len


class Job:
    """A heavy request waiting for, or running on, the worker."""

    def __init__(self, conn: ServerConnection, request: messages.Request) -> None:
        self.conn = conn
        self.request = request
        self.op: rq.Request[Any] = request.op
        assert conn.session is not None  # requests are read only after the handshake
        self.session: Session = conn.session
        self.cancel = threading.Event()
        self.position: int | None = None
        self.finished = False
        self.timed_out = False  # cancelled by the server's request timeout
        self.started: float | None = None  # time.monotonic() when the worker took it
        self._shown_waiting = False  # a "queued" event with others ahead was sent

    def emit(self, event: dict[str, Any]) -> None:
        """Send one of this request's events, unless the client asked not to have it.

        With ``events="shown"`` (a progress bar and no callback) a request that starts at once
        gets no event at all: "queued" is sent only while others run ahead of it, and
        "started" only after such a "queued" (a bar shows nothing else of either). Each event is
        a frame encoded, written and read: on a short run that was a third of the remote fixed
        cost.
        """
        wanted = self.request.events
        if wanted == "none":
            return
        if wanted == "shown":
            kind = event.get("type")
            if kind == "queued":
                if not event.get("ahead"):
                    return
                self._shown_waiting = True
            elif kind == "started" and not self._shown_waiting:
                return
        self.conn.send(messages.event(self.request.id, event))


class ServerConnection:
    """``host`` is the peer's address (the unit of the admission guard's caps and backoff);
    ``ssl_context`` wraps the socket in TLS before the cloche handshake."""

    def __init__(self, server: Server, sock: socket.socket, peer: str, host: str, *,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.server = server
        self.peer = peer
        self.host = host
        self._ssl = ssl_context
        self.framed = FramedSocket(sock, limits=Limits.handshake())
        self.session: Session | None = None
        self.jobs: dict[int, Job] = {}
        self._lock = threading.Lock()
        # After the handshake every outgoing frame goes through one writer thread, so that the
        # worker never blocks on a slow or vanished peer and frames keep their order. The outbox
        # is bounded in bytes (see _post): a peer that stops reading cannot make it grow.
        self._outbox: deque[codec.Encoded | bytes | None] = deque()
        self._queued = 0  # bytes in the outbox, not counting the frame the writer is sending
        self._writing = False  # the writer is sending a frame (outside the condition's lock)
        self._outbox_cond = threading.Condition()
        self._dead = False  # no more frames will be sent (overflow, or the peer is gone)
        self._writer: threading.Thread | None = None
        self.peer_versions: dict[str, str] | None = None
        self._authenticated = False
        self._evicted = False
        self._shm_offer: shm.Offer | None = None  # offered in the welcome, until proven

    # ----------------------------------------------------------------- lifecycle
    def serve(self) -> None:
        try:
            if self._handshake():
                self._loop()
        except errors.ConnectionError as exc:
            log.debug("connection %s lost: %s", self.peer, exc)
        except errors.ProtocolError as exc:
            log.warning("closing connection %s: protocol error: %s", self.peer, exc)
            self.send(messages.error(None, to_payload(exc, None)))
        except Exception:  # the server never dies from a connection
            log.exception("unexpected error on connection %s", self.peer)
        finally:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            with self._outbox_cond:  # flush what is queued (a final error, say), then stop
                self._outbox.append(None)
                self._outbox_cond.notify_all()
            self._writer.join(timeout=5)
        self.framed.close()  # closes the shared memory files the client did not release
        self._close_offer()
        with self._lock:
            jobs = list(self.jobs.values())
        for job in jobs:
            self.server.cancel_job(job)
        session, self.session = self.session, None
        if session is not None:
            self.server.sessions.release(session)
        self.server.forget(self)

    def _handshake(self) -> bool:
        """TLS (if configured) and the cloche handshake, under one deadline for the whole."""
        config = self.server.config
        self.framed.deadline = time.monotonic() + config.handshake_timeout
        try:
            if self._ssl is not None and not self._start_tls(self._ssl):
                return False
            shake = ServerHandshake({p.name: p.token for p in config.principals})
            try:
                hello = self.framed.recv(allow_code=False)
                if hello is None:
                    return False
                self.framed.send(shake.receive(hello))
                auth = self.framed.recv(allow_code=False)
                if auth is None:
                    return False
                welcome = shake.receive(auth)
                self._authenticated = True  # from here on, never evicted
            except errors.AuthError as exc:
                log.warning("refused %s: %s", self.peer, exc)
                if self.server.guard.failed(self.host):
                    log.warning("refusing %s for a while: %d failed authentications", self.host,
                                self.server.guard.failures(self.host))
                self.send(ServerHandshake.refusal("authentication failed"))
                self._drain()
                return False
            except errors.VersionMismatch as exc:
                log.warning("refused %s: %s", self.peer, exc)
                self.send(ServerHandshake.refusal(
                    f"the client speaks cloche protocol version {exc.received}, this server"
                    f" speaks {exc.speaks}: install the same cloche release on both sides",
                    code="version"))
                self._drain()
                return False
            except errors.ProtocolError as exc:
                log.warning("refused %s: not a cloche client (%s)", self.peer, exc)
                self.send(ServerHandshake.refusal(f"protocol error: {exc}", code="protocol"))
                self._drain()
                return False
        except errors.ConnectionError as exc:
            log.info("dropped %s during the handshake: %s", self.peer, exc)
            return False
        finally:
            self.server.guard.release(self)
        self.peer_versions = shake.peer_versions
        skew = code_skew(local_versions(), self.peer_versions, me="this server",
                         them=f"the client at {self.peer}")
        if skew:
            log.warning("%s", skew)
        principal = shake.principal or OWNER
        self.peer = f"{principal}@{self.peer}"  # every later log line names the principal
        session, resumed = self.server.sessions.open(shake.session, principal)
        self.session = session
        welcome.update(session=session.id, resumed=resumed, info=self.server.info)
        if shake.peer_wants_shm and config.shared_memory and shm.available():
            try:
                self._shm_offer = shm.Offer()
                welcome["shm"] = self._shm_offer.message()
            except OSError as exc:
                log.debug("no shared memory for %s: %s", self.peer, exc)
        self.framed.send(welcome)
        self.framed.deadline = None
        self.framed.limits = Limits(max_body=config.max_frame_bytes)
        self.framed.sock.settimeout(None)
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name=f"cloche-writer-{self.peer}")
        self._writer.start()
        log.info("session %s %s from %s", session.id[:8], "resumed" if resumed else "opened",
                 self.peer)
        return True

    def evict(self) -> None:
        """Make room for a newcomer (the admission guard's call, from the accept thread)."""
        if self._authenticated:
            return  # it authenticated just as the guard picked it: it stays
        log.info("evicted %s: a half-open connection, to make room for another address",
                 self.peer)
        self._evicted = True
        self.framed.abort()  # the handshake fails at once; this connection's thread cleans up

    def _drain(self) -> None:
        """Before closing on a refusal: read what the peer already sent, so that the close is
        a FIN, not a reset that could destroy the refusal before the peer reads it."""
        sock = self.framed.sock
        try:
            sock.setblocking(False)
            for _ in range(16):
                if not socket.socket.recv(sock, 65536):  # raw bytes, TLS or not: we are leaving
                    return
        except OSError:
            pass  # nothing more to read (or already gone)

    def _start_tls(self, context: ssl.SSLContext) -> bool:
        """The TLS handshake, under the connection's deadline.

        A peer whose first byte is the cloche magic's is a plain client: it gets a plain
        ``refused`` that says the server wants TLS, rather than a TLS error it cannot read.
        """
        raw = self.framed.sock
        deadline = self.framed.deadline
        assert deadline is not None
        try:
            raw.settimeout(max(deadline - time.monotonic(), 0.001))
            first = raw.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.info("dropped %s before TLS: %s", self.peer, exc)
            return False
        if first == frames.MAGIC[:1]:
            log.warning("refused %s: a plain (non-TLS) cloche client on a TLS server", self.peer)
            self.send(ServerHandshake.refusal(
                "this server only accepts TLS connections: connect with tls=True (or tls= the"
                " server's certificate or CA file)", code="tls"))
            self._drain()
            return False
        if not first:
            return False
        try:
            tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: %s", self.peer, exc)
            return False
        self.framed.sock = tls
        if self._evicted:  # evicted while the socket changed hands: abort() missed it
            return False
        try:
            # CPython bounds the whole TLS handshake by the socket timeout (not each read)
            tls.settimeout(max(deadline - time.monotonic(), 0.001))
            tls.do_handshake()
        except (ssl.SSLError, OSError) as exc:
            log.warning("refused %s: TLS handshake failed: %s", self.peer, exc)
            return False
        return True

    # ----------------------------------------------------------------- requests
    def _loop(self) -> None:
        while True:
            try:
                pending = self.framed.recv_pending(allow_code=True)
            except shm.ShmFrameError as exc:  # read whole: fail its request, go on
                peeked = exc.peek
                rid = peeked.get("id") if type(peeked) is dict else None
                if type(rid) is not int:
                    raise
                self.send_error(rid, exc, wait=True)
                continue
            if pending is None:
                return
            self.release_shared_memory()
            try:
                msg = pending.finish()
            except errors.UsageError as exc:  # shipped code that cannot load here
                peeked = pending.peek()
                rid = peeked.get("id") if type(peeked) is dict else None
                skew = code_skew(local_versions(), self.peer_versions, me="this server",
                                 them="the client")
                if skew:
                    exc = errors.UsageError(f"{exc.message} ({skew})")
                self.send_error(rid if type(rid) is int else None, exc, wait=True)
                continue
            if type(msg) is dict and msg.get("kind") in (messages.SHM, messages.SHM_RELEASE):
                self._shared_memory(msg)
                continue
            try:
                request = messages.parse_request_or_cancel(msg)
            except errors.ProtocolError as exc:
                rid = msg.get("id") if type(msg) is dict else None
                log.warning("bad request from %s: %s", self.peer, exc)
                self.send_error(rid if type(rid) is int else None, exc, wait=True)
                continue
            self._dispatch(request)

    def _shared_memory(self, msg: dict) -> None:
        """The client's proof that it opened the offer (from now on large replies go through
        shared memory), or its release of files it no longer maps (reused for later replies)."""
        if msg["kind"] == messages.SHM_RELEASE:
            shm.take_back(self.framed.shm_sender, msg.get("fds"))
            return
        sender = shm.proven_sender(self._shm_offer, msg.get("proof"))
        self._close_offer()
        if sender is None:
            log.debug("%s sent a wrong shared memory proof: replies stay on TCP", self.peer)
            return
        self.framed.shm_sender = sender
        log.debug("%s receives large replies through shared memory", self.peer)
        if msg.get("offer") is None:
            return
        try:  # the client offers to send its large requests the same way
            pid, proof = shm.accept_offer(msg["offer"])
        except errors.ProtocolError as exc:
            log.debug("%s offered shared memory that cannot be opened here: %s", self.peer, exc)
            return
        self.framed.shm_receiver = shm.Receiver(pid,
                                                max_size=self.server.config.max_frame_bytes)
        self.send(messages.shm_proof(proof))

    def release_shared_memory(self) -> None:
        """Give back the client's request files whose mappings are gone (it reuses them);
        after each frame read and each result: never from the finalizer that frees one."""
        receiver = self.framed.shm_receiver
        fds = receiver.given_back() if receiver is not None else None
        if fds:
            self.send(messages.shm_release(fds))

    def _close_offer(self) -> None:
        offer, self._shm_offer = self._shm_offer, None
        if offer is not None:
            offer.close()

    def _dispatch(self, request: messages.Request) -> None:
        if request.op is None:  # cancel
            with self._lock:
                job = self.jobs.get(request.id)
            if job is not None:
                self.server.cancel_job(job)
            return
        if not isinstance(request.op, rq.Request):
            self.send_error(request.id, errors.UsageError(
                f"{type(request.op).__name__} is not a request"), wait=True)
            return
        try:  # a peer need not have used the facade: check every field before running it
            request.op.check(self.server.model_info)
        except errors.UsageError as exc:
            self.send_error(request.id, exc, wait=True)
            return
        except Exception as exc:  # noqa: BLE001 - a check that trips on junk: still the answer
            log.warning("checking a %s from %s raised %r", type(request.op).__name__, self.peer,
                        exc)
            self.send_error(request.id, errors.UsageError(
                f"malformed {type(request.op).__name__} request: {type(exc).__name__}: {exc}"),
                wait=True)
            return
        if not request.op.is_heavy:
            self._run_light(request)
            return
        with self._lock:
            job = None if request.id in self.jobs else Job(self, request)
            if job is not None:
                self.jobs[request.id] = job
        if job is None:
            self.send_error(request.id, errors.UsageError(f"request id {request.id} is in use"),
                            wait=True)
            return
        self.server.enqueue(job)

    def _run_light(self, request: messages.Request) -> None:
        assert self.session is not None
        executor = SessionExecutor(self.server.executor, self.session)
        try:
            if isinstance(request.op, rq.ServerStatus):  # the server's own state, not the model's
                value = self.server.status(self.session)
            else:
                value = executor.execute(request.op)
        except Exception as exc:  # noqa: BLE001 - any failure is the client's answer
            self.send_error(request.id, exc, wait=True)
            return
        self.send_result(request.id, value, wait=True)

    def finish(self, job: Job) -> None:
        with self._lock:
            self.jobs.pop(job.request.id, None)

    # ----------------------------------------------------------------- replies
    def _write_loop(self) -> None:
        while True:
            with self._outbox_cond:
                self._outbox_cond.wait_for(lambda: bool(self._outbox))
                encoded = self._outbox.popleft()
                if encoded is None:
                    return
                self._queued -= _size(encoded)  # now in flight: no longer counts as queued
                self._writing = True
                self._outbox_cond.notify_all()
            try:
                if isinstance(encoded, bytes):
                    self.framed.send_raw(encoded)
                else:
                    self.framed.send_encoded(encoded)
            except errors.ConnectionError:
                self._give_up()
                self.framed.abort()  # wakes the reader, which cleans up
                return
            finally:
                with self._outbox_cond:
                    self._writing = False

    def _backlog(self) -> int:
        """Bytes queued behind the next frame out (call with ``_outbox_cond`` held)."""
        head = self._outbox[0] if self._outbox else None
        return self._queued - (0 if head is None else _size(head))

    def _give_up(self) -> None:
        """Send nothing more: drop what is queued (freeing its memory) and wake any waiter."""
        with self._outbox_cond:
            self._dead = True
            closing = None in self._outbox
            self._outbox.clear()
            if closing:
                self._outbox.append(None)
            self._queued = 0
            self._outbox_cond.notify_all()

    def _post(self, encoded: codec.Encoded, *, wait: bool = False) -> bool:
        """Queue a frame for the writer; False when it will not be sent.

        The bound is on the *backlog*: the bytes queued behind the next frame to go out (the
        frame being sent and the one after it are the peer's current reply, whatever their
        size, so a big reply still reaches a client that reads). With ``wait`` (the replies to
        light requests, made on this connection's own thread while it holds no lock) a frame
        waits until it fits under ``max_outbox_bytes`` (or the backlog is empty): the peer is
        slowed down to the pace at which it reads. Anything else — results and events from the
        worker, or from another connection's thread, which must never wait for one client — joins
        while the backlog is at most the bound; finding it over the bound means the peer has
        stopped reading: the connection is closed and its requests are cancelled. So a
        connection never holds more than the bound plus three frames.
        """
        if self._writer is None:  # still in the handshake: write directly
            try:
                self.framed.send_encoded(encoded)
            except errors.ConnectionError:
                return False
            return True
        bound = self.server.config.max_outbox_bytes
        size = _size(encoded)
        with self._outbox_cond:
            if wait:  # and leaves the worker its headroom
                self._outbox_cond.wait_for(
                    lambda: self._dead or self._backlog() == 0 or self._backlog() + size <= bound)
            if self._dead or self.framed.closed:
                return False
            item: codec.Encoded | bytes = encoded
            if not self._outbox and not self._writing:
                # Nothing is queued or being written: a small frame goes out from this thread
                # if the socket takes it at once, sparing the hand-off to the writer.
                try:
                    rest = self.framed.send_nowait(encoded)
                except errors.ConnectionError:
                    rest = encoded  # the writer meets the same failure and cleans up
                if rest is None:
                    return True
                item, size = rest, _size(rest)
            overflow = self._backlog()
            if overflow <= bound:
                self._outbox.append(item)
                self._queued += size
                self._outbox_cond.notify_all()
                return True
        log.warning("closing connection %s: it is not reading its replies (%d bytes queued, the"
                    " limit is %d)", self.peer, overflow, bound)
        self._give_up()
        self.framed.abort()  # wakes the reader and the writer; the reader cleans up
        return False

    def send(self, message: Any, *, wait: bool = False) -> bool:
        """Queue a message for the peer; False when it cannot be sent (the peer is gone).

        ``wait``: only on this connection's thread, holding no lock (see :meth:`_post`).
        """
        try:
            return self._post(codec.encode(message), wait=wait)
        except errors.UsageError:
            return False

    def send_result(self, rid: int, value: Any, *, wait: bool = False) -> None:
        self.release_shared_memory()
        try:
            encoded = codec.encode(messages.result(rid, value))
        except errors.UsageError as exc:
            self.send_error(rid, errors.UsageError(f"the result cannot be sent: {exc}"),
                            wait=wait)
            return
        self._post(encoded, wait=wait)

    def send_error(self, rid: int | None, exc: BaseException, *, wait: bool = False) -> None:
        if not isinstance(exc, (errors.Cancelled, errors.UsageError)):
            log.info("request %s from %s failed: %s: %s", rid, self.peer, type(exc).__name__, exc)
        self.send(messages.error(rid, to_payload(exc, rid)), wait=wait)
