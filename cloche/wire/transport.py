"""The thin socket layer: frames in and out of a (possibly TLS) socket.

Everything protocol-shaped lives in :mod:`frames`, :mod:`codec` and :mod:`handshake`; this module
only moves bytes. Bodies are sent in chunks straight from the tensors' memory and received with
``recv_into`` straight into the tensors the codec allocated (no intermediate copies). Small
reads go through a 64 KiB read-ahead buffer instead, so that a small frame — preamble, header
and body, most requests and replies — costs one ``recv`` rather than one per part. OS-level
failures become :class:`cloche.errors.ConnectionError` here, once.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from typing import Any

from cloche import errors
from cloche.wire import codec, frames, shm

__all__ = [
    "FramedSocket",
    "client_ssl_context",
    "listen",
    "open_connection",
    "server_ssl_context",
    "turn_away",
]

_CHUNK = 64 * 1024 * 1024
_SMALL = 64 * 1024
_DONTWAIT: int | None = getattr(socket, "MSG_DONTWAIT", None)
#: OpenSSL's reasons when the peer's first bytes are not a TLS record (a plain server's reply)
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG",
                      "UNKNOWN_PROTOCOL", "HTTP_REQUEST", "UNEXPECTED_RECORD"})


class FramedSocket:
    """Sends and receives whole messages on one socket.

    ``send`` is thread-safe (one frame at a time); ``recv`` must be called from one thread only.
    ``limits`` may be replaced after the handshake (small before, large after). ``deadline``
    (a :func:`time.monotonic` time, or None) bounds every send and receive until it is reset:
    one deadline for a whole exchange, however slowly the peer trickles its bytes.

    Once shared memory is negotiated (:mod:`cloche.wire.shm`), ``shm_sender`` sends frames
    whose buffers reach ``shm.THRESHOLD`` bytes through a memfd, and ``shm_receiver`` maps the
    peer's; both are None on a plain connection.
    """

    def __init__(self, sock: socket.socket, *, limits: frames.Limits | None = None) -> None:
        self.sock = sock
        self.limits = limits or frames.Limits()
        self.deadline: float | None = None
        self._send_lock = threading.Lock()
        self._closed = False
        # read-ahead for small reads: bytes [_ahead_start, _ahead_end) of _ahead are received
        # but not yet handed out (allocated on the first small read)
        self._ahead: memoryview | None = None
        self._ahead_start = 0
        self._ahead_end = 0
        self.shm_sender: shm.Sender | None = None
        self.shm_receiver: shm.Receiver | None = None

    def _arm(self) -> None:
        """Before each socket call under a deadline: time out when the deadline does."""
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the deadline passed")
            self.sock.settimeout(remaining)

    # ------------------------------------------------------------------ sending
    def send(self, message: Any) -> None:
        self.send_encoded(codec.encode(message))

    def send_encoded(self, encoded: codec.Encoded) -> None:
        body_len = encoded.body_len
        sender = self.shm_sender
        if sender is not None and body_len >= shm.THRESHOLD:
            descriptor = sender.write(encoded.buffers)  # None: over TCP after all
            if descriptor is not None:  # the body is the descriptor of the file holding it
                self.send_raw(frames.encode_preamble(len(encoded.header), len(descriptor),
                                                     frames.FLAG_SHM)
                              + encoded.header + descriptor)
                return
        head = frames.encode_preamble(len(encoded.header), body_len) + encoded.header
        try:
            with self._send_lock:
                if self._closed:
                    raise OSError("the connection is closed")
                self._arm()
                if body_len <= _SMALL:
                    self.sock.sendall(b"".join([head, *encoded.buffers]))
                    return
                self.sock.sendall(head)
                for buf in encoded.buffers:
                    for start in range(0, buf.nbytes, _CHUNK):
                        self.sock.sendall(buf[start : start + _CHUNK])
        except (OSError, ValueError) as exc:  # ValueError: a closed SSL socket
            raise errors.ConnectionError(f"connection lost while sending: {exc}") from exc

    def send_nowait(self, encoded: codec.Encoded) -> codec.Encoded | bytes | None:
        """Send a small frame only as far as the socket takes it without waiting.

        Returns None when the whole frame went out; ``encoded`` itself when nothing went (a TLS
        socket, a frame over 64 KiB, a platform without ``MSG_DONTWAIT``, another send under
        way, or a full socket buffer); else the bytes still to send, which must go next, with
        :meth:`send_raw`, to keep the stream in sync. For a sender that must never block on
        the peer (the server's worker) but need not hand its reply to a writer thread when the
        socket has room, which is nearly always.
        """
        if (_DONTWAIT is None or len(encoded.header) + encoded.body_len > _SMALL
                or isinstance(self.sock, ssl.SSLSocket)
                or not self._send_lock.acquire(blocking=False)):
            return encoded
        try:
            if self._closed:
                raise OSError("the connection is closed")
            data = b"".join([frames.encode_preamble(len(encoded.header), encoded.body_len),
                             encoded.header, *encoded.buffers])
            sent = self.sock.send(data, _DONTWAIT)
        except BlockingIOError:
            return encoded
        except (OSError, ValueError) as exc:
            raise errors.ConnectionError(f"connection lost while sending: {exc}") from exc
        finally:
            self._send_lock.release()
        return None if sent == len(data) else data[sent:]

    def send_raw(self, data: bytes) -> None:
        """Send bytes that complete a frame begun by :meth:`send_nowait`."""
        try:
            with self._send_lock:
                if self._closed:
                    raise OSError("the connection is closed")
                self._arm()
                self.sock.sendall(data)
        except (OSError, ValueError) as exc:
            raise errors.ConnectionError(f"connection lost while sending: {exc}") from exc

    # ---------------------------------------------------------------- receiving
    def recv(self, *, allow_code: bool = False) -> Any:
        """The next message, or None when the peer closed the connection between frames."""
        pending = self.recv_pending(allow_code=allow_code)
        return None if pending is None else pending.finish()

    def recv_pending(self, *, allow_code: bool = False) -> codec.PendingMessage | None:
        """Like :meth:`recv` but leaves pickled fields to ``finish()`` (see PendingMessage)."""
        raw = bytearray(frames.PREAMBLE_SIZE)
        if not self._fill(memoryview(raw), at_boundary=True):
            return None
        receiver = self.shm_receiver
        preamble = frames.parse_preamble(
            raw, self.limits, allowed_flags=0 if receiver is None else frames.FLAG_SHM)
        if preamble.extended:
            extra = bytearray(frames.EXTENDED_SIZE)
            self._fill(memoryview(extra))
            preamble = frames.parse_extended(preamble, extra, self.limits)
        header = self._read_header(preamble.header_len)
        if preamble.flags & frames.FLAG_SHM:
            assert receiver is not None
            return self._mapped_frame(receiver, header, preamble.body_len, allow_code)
        pending = codec.decode_header(header, preamble.body_len, allow_code=allow_code)
        for target in pending.targets:
            if target.nbytes:
                self._fill(target)
        return pending

    def _mapped_frame(self, receiver: shm.Receiver, header: bytes | bytearray, body_len: int,
                      allow_code: bool) -> codec.PendingMessage:
        """A frame whose buffers are in the peer's shared memory file: map it, decode views.

        The frame is read whole before the file is opened, so a file that cannot be mapped
        (:class:`shm.ShmFrameError`) leaves the stream in sync.
        """
        if body_len != shm.DESCRIPTOR_SIZE:
            raise errors.ProtocolError(f"a shared memory frame's body is {shm.DESCRIPTOR_SIZE}"
                                       f" bytes, not {body_len}")
        descriptor = bytearray(body_len)
        self._fill(memoryview(descriptor))
        try:
            mapped = receiver.map(descriptor)
        except errors.ProtocolError as exc:
            raise shm.ShmFrameError(exc.message, codec.peek_header(header)) from exc
        return codec.decode_header(header, mapped.size, allow_code=allow_code,
                                   mapped=mapped.buffer)

    def _read_header(self, size: int) -> bytes | bytearray:
        """The header's bytes, in memory that grows as they arrive.

        A peer may announce a header of up to ``limits.max_header`` bytes and send none of it:
        memory is taken in chunks that double from 64 KiB, each only once the previous one is
        full, so what is held never exceeds twice what arrived (plus 64 KiB).
        """
        if size <= _SMALL:
            header = bytearray(size)
            self._fill(memoryview(header))
            return header
        chunks: list[bytearray] = []
        got, step = 0, _SMALL
        while got < size:
            chunk = bytearray(min(step, size - got))
            self._fill(memoryview(chunk))
            chunks.append(chunk)
            got += len(chunk)
            step = min(2 * step, _CHUNK)
        return b"".join(chunks)

    def _fill(self, view: memoryview, *, at_boundary: bool = False) -> bool:
        """Fill ``view`` from the read-ahead buffer, then from the socket.

        What is still missing is read straight into ``view`` when it is 64 KiB or more (a
        tensor's bytes: zero-copy), else into the read-ahead buffer, which takes whatever has
        arrived (up to 64 KiB: the rest of a small frame, often the next ones too).
        """
        total = view.nbytes
        got = min(self._ahead_end - self._ahead_start, total)
        if got:
            start = self._ahead_start
            assert self._ahead is not None
            view[:got] = self._ahead[start : start + got]
            self._ahead_start = start + got
        try:
            while got < total:
                self._arm()
                need = total - got
                if need < _SMALL:
                    ahead = self._ahead
                    if ahead is None:
                        ahead = self._ahead = memoryview(bytearray(_SMALL))
                    n = self.sock.recv_into(ahead, _SMALL)
                    take = min(n, need)
                    view[got : got + take] = ahead[:take]
                    self._ahead_start, self._ahead_end = take, n
                else:
                    n = take = self.sock.recv_into(view[got:], min(need, _CHUNK))
                if n == 0:
                    if at_boundary and got == 0:
                        return False
                    raise errors.ConnectionError("connection closed in the middle of a frame")
                got += take
        except TimeoutError as exc:
            raise errors.ConnectionError("timed out waiting for the peer") from exc
        except (OSError, ValueError) as exc:
            raise errors.ConnectionError(f"connection lost while receiving: {exc}") from exc
        return True

    # ------------------------------------------------------------------ closing
    def abort(self) -> None:
        """Shut the connection down from any thread: blocked sends and receives fail at once.

        The descriptor stays open: the thread that receives closes it (:meth:`close`). A
        descriptor closed under a thread about to read it can be reused at once by a new
        connection, whose bytes that thread would then steal (TLS reads a 5-byte record
        header before Python can notice the close).
        """
        try:
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)  # the raw socket, TLS or not
        except OSError:
            pass  # already disconnected

    def close(self) -> None:
        """Shut down and close; only from the thread that receives (or when none does).

        Sends are fenced off by the send lock, so no send uses the descriptor once it closes.
        """
        if self._closed:
            return
        self.abort()  # first: a send blocked on a peer that does not read lets go of the lock
        with self._send_lock:
            self._closed = True
            self.sock.close()
        if self.shm_sender is not None:
            self.shm_sender.close()

    @property
    def closed(self) -> bool:
        return self._closed


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def open_connection(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float | None = 30.0
) -> socket.socket:
    """A connected TCP (or TLS) socket; raises cloche ConnectionError/AuthError on failure."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise errors.ConnectionError(f"cannot connect to {host}:{port}: {exc}") from exc
    _tune(sock)
    if ssl_context is not None:
        try:
            sock = ssl_context.wrap_socket(sock, server_hostname=host)
        except ssl.SSLError as exc:
            sock.close()
            if exc.reason in _NOT_TLS:
                raise errors.ConnectionError(
                    f"{host}:{port} did not answer in TLS ({exc.reason}): it is probably a"
                    " cloche server without TLS. Connect without tls=, or start the server with"
                    " --tls-cert/--tls-key") from exc
            raise errors.AuthError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
        except OSError as exc:
            sock.close()
            raise errors.ConnectionError(f"TLS handshake with {host}:{port} failed: {exc}") from exc
    sock.settimeout(None)
    return sock


def listen(host: str, port: int, *, backlog: int = 64) -> socket.socket:
    """A listening TCP socket (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise errors.ConnectionError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(backlog)
    return sock


def accepted(sock: socket.socket) -> socket.socket:
    """Tune a freshly accepted socket like a connecting one."""
    _tune(sock)
    return sock


def turn_away(sock: socket.socket, message: Any = None) -> None:
    """Close a just-accepted socket, first sending ``message`` (one small frame) if given.

    Never blocks: the frame goes out only if it fits the socket buffer (it always does on a
    fresh connection). Whatever the peer already sent is drained first, so that the close is a
    FIN and not a reset, which could destroy the frame before the peer reads it.
    """
    try:
        sock.setblocking(False)
        if message is not None:
            encoded = codec.encode(message)
            sock.send(frames.encode_preamble(len(encoded.header), 0) + encoded.header)
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536):
                break
    except (OSError, errors.ClocheError):
        pass  # best effort: the peer is being turned away anyway
    finally:
        sock.close()


def server_ssl_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise errors.UsageError(f"cannot load TLS certificate {certfile!r}: {exc}") from exc
    return context


def client_ssl_context(tls: bool | str | ssl.SSLContext | None) -> ssl.SSLContext | None:
    """``True``: verify against the system CAs; a path: trust that CA/certificate file."""
    if tls is None or tls is False:
        return None
    if isinstance(tls, ssl.SSLContext):
        return tls
    if tls is True:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=str(tls))
    except (OSError, ssl.SSLError) as exc:
        raise errors.UsageError(f"cannot load TLS CA file {tls!r}: {exc}") from exc
