"""One client connection: handshake, a reader thread, and request ids mapped to futures.

Requests are sent from the caller's thread (one frame at a time); a single reader thread
receives every reply and resolves the matching future, feeding queue-position and progress
events to the request's callback on the way. Cancelling a future sends a ``cancel`` for its id
and leaves the connection usable. If the stream may be corrupt (a send was interrupted halfway
through a frame) the connection is closed; the owner reconnects with the same session.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import ssl
import threading
import warnings
from collections.abc import Callable
from typing import Any

from cloche import errors
from cloche.api.futures import RequestFuture
from cloche.client.shipping import ship_local_modules
from cloche.errors.payload import from_payload
from cloche.wire import messages, shm
from cloche.wire.frames import Limits
from cloche.wire.handshake import ClientHandshake, code_skew
from cloche.wire.transport import FramedSocket, open_connection

__all__ = ["ClientConnection"]

log = logging.getLogger("cloche.client")
EventCallback = Callable[[dict[str, Any]], None]


class ClientConnection:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        token: str,
        session: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        timeout: float = 30.0,
        shared_memory: bool = True,
    ) -> None:
        self.address = f"{host}:{port}"
        sock = open_connection(host, port, ssl_context=ssl_context, timeout=timeout)
        # Small frames only until the server has proven it knows the token.
        self._framed = FramedSocket(sock, limits=Limits(max_header=64 * 1024, max_body=0))
        self._calls: dict[int, tuple[RequestFuture[Any], EventCallback | None]] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._reader: threading.Thread | None = None
        self.peer_versions: dict[str, str] | None = None
        self._skew: str | None = None
        self._shm_offer: shm.Offer | None = None  # for requests, until the server proves it
        try:
            welcome = self._handshake(token, session, timeout,
                                      shared_memory and shm.available())
            # An authenticated server is trusted with big headers (large plain-data results).
            self._framed.limits = Limits(max_header=1 << 30)
            self._accept_shared_memory(welcome.get("shm"))
        except BaseException:
            self._framed.close()
            self._close_offer()
            raise
        self.session: str = welcome["session"]
        self.resumed: bool = bool(welcome.get("resumed"))
        self.info: dict[str, Any] = dict(welcome.get("info") or {})
        self._reader = threading.Thread(target=self._read_loop,
                                        name=f"cloche-client-{self.address}", daemon=True)
        # Shared memory files given back while no request goes out are sent by a thread of
        # their own: the reader must never wait for the send lock (a caller sending a big
        # request may hold it while the server waits for this client to read its replies).
        self._releases = threading.Event()
        self._reader.start()
        if self._framed.shm_receiver is not None:
            threading.Thread(target=self._release_loop, daemon=True,
                             name=f"cloche-release-{self.address}").start()

    def _handshake(self, token: str, session: str | None, timeout: float,
                   shared_memory: bool) -> dict:
        shake = ClientHandshake(token, session=session, shared_memory=shared_memory)
        self._framed.sock.settimeout(timeout)
        self._framed.send(shake.start())
        while not shake.done:
            msg = self._framed.recv(allow_code=False)
            if msg is None:
                raise errors.AuthError(f"{self.address} closed the connection during the handshake")
            reply = shake.receive(msg)
            if reply is not None:
                self._framed.send(reply)
        self._framed.sock.settimeout(None)
        welcome = shake.welcome or {}
        if not isinstance(welcome.get("session"), str):
            raise errors.ProtocolError("the server's welcome lacks a session id")
        self.peer_versions = shake.peer_versions
        self._skew = code_skew(shake.versions, self.peer_versions, me="this client",
                               them=f"the server at {self.address}")
        if self._skew:
            warnings.warn(self._skew, RuntimeWarning, stacklevel=5)
        return welcome

    def _accept_shared_memory(self, offer: Any) -> None:
        """Take the server's shared memory offer if this process can open it (same host, same
        user, same pid namespace); otherwise stay on TCP, saying why at debug level."""
        if offer is None:
            return
        try:
            pid, proof = shm.accept_offer(offer)
        except errors.ProtocolError as exc:
            log.debug("shared memory with %s unavailable, using TCP: %s", self.address, exc)
            return
        # ready for shared memory frames before the server may send any (after the proof)
        self._framed.shm_receiver = shm.Receiver(pid, max_size=self._framed.limits.max_body)
        try:  # and large requests may go the other way, once the server proves it can
            self._shm_offer = shm.Offer()
        except OSError as exc:
            log.debug("cannot offer shared memory to %s: %s", self.address, exc)
        offer = self._shm_offer
        self._framed.send(messages.shm_proof(proof, offer.message() if offer else None))

    def _shared_memory(self, msg: dict) -> None:
        """The server's proof that it opened this client's offer (from now on large requests
        go through shared memory), or its release of request files it no longer maps."""
        if msg["kind"] == messages.SHM_RELEASE:
            shm.take_back(self._framed.shm_sender, msg.get("fds"))
            return
        sender = shm.proven_sender(self._shm_offer, msg.get("proof"))
        self._close_offer()
        if sender is None:
            log.debug("%s sent a wrong shared memory proof: requests stay on TCP", self.address)
        else:
            self._framed.shm_sender = sender

    def _close_offer(self) -> None:
        offer, self._shm_offer = self._shm_offer, None
        if offer is not None:
            offer.close()

    def _release_loop(self) -> None:
        while not self._closed:
            self._releases.wait()
            self._releases.clear()
            if self._closed:
                return
            try:
                self._release_shm()
            except errors.ConnectionError:
                return  # the reader notices too and fails what is pending

    def _release_shm(self) -> None:
        """Give back the shared memory files whose mappings are gone (the server reuses them).

        Called before each request, and by the release thread after each reply is read:
        never from the finalizer that frees a mapping, which may run in the middle of a send
        on this very thread.
        """
        receiver = self._framed.shm_receiver
        fds = receiver.given_back() if receiver is not None else None
        if fds:
            self._framed.send(messages.shm_release(fds))

    @property
    def shared_memory(self) -> bool:
        """Whether large replies arrive through shared memory (negotiated at connect)."""
        return self._framed.shm_receiver is not None

    # ----------------------------------------------------------------- requests
    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, op: Any, *, on_event: EventCallback | None = None) -> RequestFuture[Any]:
        """Send request record ``op``; its future's ``cancel()`` cancels it on the server."""
        if self._closed:
            raise errors.ConnectionError(f"the connection to {self.address} is closed")
        rid = next(self._ids)
        future: RequestFuture[Any] = RequestFuture(
            type(op).__name__.lower(), on_cancel=lambda: self.send_cancel(rid), request_id=rid)
        with self._lock:
            self._calls[rid] = (future, on_event)
        ship_local_modules()  # the user's own helper modules travel by value (see shipping)
        # a progress reporter says which events it shows (a plain callable gets them all)
        events = "none" if on_event is None else getattr(on_event, "wanted_events", "all")
        message = messages.request(rid, op, events)
        try:
            self._release_shm()
            self._framed.send(message)
        except errors.ConnectionError as exc:
            self._fail_all(exc)
            raise
        except errors.UsageError:
            with self._lock:
                self._calls.pop(rid, None)
            raise
        except BaseException:  # interrupted halfway through a frame: the stream is unusable
            self.close()
            raise
        return future

    def send_cancel(self, rid: int) -> None:
        if self._closed:
            return
        try:
            self._framed.send(messages.cancel(rid))
        except errors.ConnectionError:
            pass  # the connection is gone, and with it the request on the server

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            reader = self._reader
            if reader is not None and reader.is_alive():
                self._framed.abort()  # the reader wakes up and closes the socket itself
            else:
                self._framed.close()
        self._fail_all(errors.ConnectionError(f"the connection to {self.address} was closed"))

    # ----------------------------------------------------------------- replies
    def _read_loop(self) -> None:
        failure: errors.ClocheError = errors.ConnectionError(
            f"the server at {self.address} closed the connection")
        try:
            while True:
                try:
                    pending = self._framed.recv_pending(allow_code=True)
                except shm.ShmFrameError as exc:  # read whole: fail its request, go on
                    self._unmapped(exc)
                    continue
                if pending is None:
                    break
                receiver = self._framed.shm_receiver
                if receiver is not None and receiver.pending:
                    self._releases.set()
                try:
                    msg = pending.finish()
                except errors.UsageError as exc:  # a pickled result that cannot load here
                    self._unloadable(pending.peek(), exc)
                    continue
                if type(msg) is dict and msg.get("kind") in (messages.SHM,
                                                             messages.SHM_RELEASE):
                    self._shared_memory(msg)
                    continue
                kind, rid, payload = messages.parse_response(msg)
                if kind == messages.EVENT:
                    self._event(rid, payload)
                elif rid is None:  # the server reports a protocol error and will close
                    failure = from_payload(payload)
                else:
                    self._resolve(kind, rid, payload)
        except errors.ClocheError as exc:
            if not self._closed:
                failure = exc
                if isinstance(exc, errors.ConnectionError):
                    failure = errors.ConnectionError(
                        f"lost the connection to {self.address}: {exc}")
        finally:
            self._closed = True
            self._releases.set()  # the release thread ends
            self._framed.close()
            self._close_offer()
            self._fail_all(failure)

    def _unmapped(self, exc: shm.ShmFrameError) -> None:
        """Fail the one request whose shared memory reply could not be mapped."""
        peeked = exc.peek
        rid = peeked.get("id") if type(peeked) is dict else None
        if type(rid) is not int or peeked.get("kind") == messages.EVENT:
            raise exc
        with self._lock:
            entry = self._calls.pop(rid, None)
        if entry is not None:
            try:
                entry[0].set_exception(errors.ProtocolError(
                    f"the reply to request {rid} could not be read from shared memory:"
                    f" {exc.message}", request_id=rid))
            except concurrent.futures.InvalidStateError:
                pass  # cancelled on this side already

    def _unloadable(self, peeked: Any, exc: errors.UsageError) -> None:
        """Fail the one request whose reply could not be loaded; the stream is still in sync."""
        rid = peeked.get("id") if type(peeked) is dict else None
        if type(rid) is not int:
            raise exc
        if self._skew:
            exc = errors.UsageError(f"{exc.message} ({self._skew})", request_id=rid)
        with self._lock:
            entry = self._calls.pop(rid, None)
        if entry is not None:
            try:
                entry[0].set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass  # cancelled on this side already

    def _event(self, rid: int | None, payload: dict) -> None:
        with self._lock:
            entry = self._calls.get(rid) if rid is not None else None
        if entry is None or entry[1] is None:
            return
        try:
            entry[1](payload)
        except Exception:  # a broken progress callback must not kill the connection
            log.exception("progress callback for request %s raised", rid)

    def _resolve(self, kind: str, rid: int, payload: Any) -> None:
        with self._lock:
            entry = self._calls.pop(rid, None)
        if entry is None:
            return
        future = entry[0]
        try:
            if kind == messages.RESULT:
                future.set_result(payload)
            else:
                future.set_exception(from_payload(payload))
        except concurrent.futures.InvalidStateError:
            pass  # cancelled on this side already

    def _fail_all(self, exc: errors.ClocheError) -> None:
        with self._lock:
            entries = list(self._calls.values())
            self._calls.clear()
        for future, _ in entries:
            try:
                future.set_exception(exc)
            except concurrent.futures.InvalidStateError:
                pass  # already cancelled or resolved
