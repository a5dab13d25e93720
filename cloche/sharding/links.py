"""Direct, authenticated TCP connections between the ranks of a CPU (gloo) group.

A message between ranks used to be a gloo ``isend`` plus an announcement in the control store,
a polled wait for it, and an acknowledgement through the store: about eight store round trips
per message, each waited for with sleeps. Here every pair of ranks keeps one TCP connection for
the life of the group; a message is written to it in one piece (a small header, then the
tensor's bytes), and a reader thread per peer puts complete messages into a mailbox keyed by
(sender, key). A receiver blocks on the mailbox's condition variable — no polling — in short
slices, between which it checks the abort flag and liveness as every other wait does
(``sharding.control``).

Setting up: each rank listens on the address it reaches the control store from (so peers on
other machines can reach it; loopback when the store is on loopback) and publishes
``host:port`` under the group's store prefix; rank ``i`` accepts from every higher rank, then
connects to every lower one. Both sides of a connection prove they hold the group's control
key (a challenge/response over fresh nonces, HMAC-SHA256) before anything else is read from
it; a connection that fails the proof is closed, and once every peer is connected the
listening socket is closed too.

What stays as it was: objects (pickles) travel sealed (``sharding.framing``) — the connection
is authenticated once, not per message, and a seal per message also holds against someone who
can inject into an established TCP stream. Tensors travel unsealed, as they did over gloo.

Bounds: a stream's sender waits for the acknowledgement of its oldest message once
``window`` are unacknowledged (``sharding.p2p``); every message carries its command number,
and once a command is drained the mailbox drops what is left of it and whatever of it still
arrives, so no stale message is ever matched by a later receive and nothing piles up.
"""

from __future__ import annotations

import ctypes
import hashlib
import hmac
import ipaddress
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from cloche.errors import Aborted, WorkerLost

__all__ = ["Links", "reachable_host"]

_MAGIC = b"clochep2"
_NONCE = 32
_HELLO = struct.Struct("<8sI32s")  # magic, the connector's rank, its nonce
_HEADER = struct.Struct("<BBHHQq")  # kind, flags, key length, meta length, bytes, command
_MSG, _ACK = 1, 2
_OBJECT, _WANTS_ACK = 1, 2  # flags
_NO_COMMAND = -1
_SLICE_S = 0.05
_IO_SLICE_S = 0.2
_LIVENESS_EVERY_S = 0.2
_HANDSHAKE_S = 10.0
_EXPLAIN_S = 1.0  # how long a broken connection waits for liveness to say why
#: the prefix of an acknowledgement's mailbox key (message keys never start with it)
ACK = "\0ack/"


def reachable_host(master_addr: str) -> str:
    """The address of this machine on the route to ``master_addr`` (where peers find us)."""
    family, _, _, _, address = socket.getaddrinfo(master_addr, 9, type=socket.SOCK_DGRAM)[0]
    if ipaddress.ip_address(address[0]).is_loopback:
        return str(address[0])
    probe = socket.socket(family, socket.SOCK_DGRAM)
    try:
        probe.connect(address)  # UDP: picks the route, sends nothing
        return str(probe.getsockname()[0])
    finally:
        probe.close()


def _proof(key: bytes, label: bytes, first: bytes, second: bytes, low: int, high: int) -> bytes:
    return hmac.new(key, label + first + second + struct.pack("<II", low, high),
                    hashlib.sha256).digest()


def _read_exact(sock: socket.socket, view: memoryview) -> None:
    at = 0
    while at < len(view):
        n = sock.recv_into(view[at:])
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        at += n


def _recv_bytes(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _read_exact(sock, memoryview(buf))
    return bytes(buf)


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ConnectionError(f"a message of unknown dtype {name!r}")
    return dtype


def _name_os_thread(name: str) -> None:
    """Name this thread for the OS too (``top -H``, /proc/<pid>/task/<tid>/comm; Linux)."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # 15: PR_SET_NAME
    except (AttributeError, OSError):
        pass


class _Reader:
    """Reads a connection through a buffer: a small message costs one ``recv``, not three."""

    def __init__(self, sock: socket.socket, size: int = 1 << 16) -> None:
        self._sock = sock
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = self._end = 0

    def wait_for(self, n: int) -> bool:
        """Buffer at least ``n`` bytes; False if the connection ends before any came."""
        if self._end - self._start >= n:
            return True
        if self._start:  # move what is left to the front
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
        if n > len(self._buf):
            self._view.release()
            self._buf.extend(bytes(n - len(self._buf)))
            self._view = memoryview(self._buf)
        while self._end - self._start < n:
            got = self._sock.recv_into(self._view[self._end:])
            if got == 0:
                if self._end == self._start == 0:
                    return False
                raise ConnectionError("the connection was closed in a message")
            self._end += got
        return True

    def take(self, n: int) -> bytes:
        out = bytes(self._view[self._start:self._start + n])
        self._start += n
        return out

    def read_into(self, view: memoryview) -> None:
        """Fill ``view``: from the buffer first, the rest straight from the socket."""
        if not len(view):
            return
        have = min(self._end - self._start, len(view))
        view[:have] = self._view[self._start:self._start + have]
        self._start += have
        if have < len(view):
            _read_exact(self._sock, view[have:])


class Links:
    """This rank's connections to every other rank, and the mailbox they deliver into."""

    def __init__(self, rank: int, key: bytes, sockets: dict[int, socket.socket]) -> None:
        self.rank = rank
        self._key = key
        self._sockets = sockets
        self._send_locks = {peer: threading.Lock() for peer in sockets}
        self._cond = threading.Condition()
        self._box: dict[tuple[int, str], tuple[int, torch.Tensor | None, bool]] = {}
        self._dead: dict[int, str] = {}
        self._floor = _NO_COMMAND  # messages of commands up to this one are dropped
        self._closing = False
        self._readers = []
        for peer, sock in sockets.items():
            # a reader blocks (close() wakes it); a send never does: it is non-blocking and
            # waits for room in slices (``_write``)
            sock.settimeout(None)
            reader = threading.Thread(target=self._read_loop, args=(peer, sock),
                                      name=f"cloche-link-{rank}<{peer}", daemon=True)
            reader.start()
            self._readers.append(reader)

    # ----------------------------------------------------------------- setting up
    @classmethod
    def open(cls, store: Any, rank: int, world_size: int, key: bytes, host: str,
             timeout_s: float) -> Links:
        """Connect to every other rank (each rank calls this at the same stage of joining)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server((host, 0), family=family, backlog=max(world_size, 8))
        sockets: dict[int, socket.socket] = {}
        try:
            port = listener.getsockname()[1]
            store.set(f"links/{rank}", f"{host}|{port}")
            deadline = time.monotonic() + timeout_s
            wanted = set(range(rank + 1, world_size))
            listener.settimeout(_SLICE_S * 4)
            while wanted:
                if time.monotonic() > deadline:
                    raise WorkerLost(f"rank {rank}: ranks {sorted(wanted)} did not connect"
                                     f" within {timeout_s:g} s")
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                peer = cls._accept(conn, rank, key, wanted)
                if peer is not None:
                    wanted.discard(peer)
                    sockets[peer] = conn
            for peer in range(rank):
                address = bytes(store.get(f"links/{peer}")).decode()
                peer_host, _, peer_port = address.rpartition("|")
                sockets[peer] = cls._connect(peer_host, int(peer_port), rank, peer, key)
        except BaseException:
            for sock in sockets.values():
                sock.close()
            raise
        finally:
            listener.close()
        return cls(rank, key, sockets)

    @staticmethod
    def _accept(conn: socket.socket, rank: int, key: bytes, wanted: set[int]) -> int | None:
        """The rank behind ``conn`` once it proved the key; None (and closed) otherwise."""
        try:
            conn.settimeout(_HANDSHAKE_S)
            magic, peer, their_nonce = _HELLO.unpack(_recv_bytes(conn, _HELLO.size))
            if magic != _MAGIC or peer not in wanted:
                raise ConnectionError("not a rank of this group")
            nonce = os.urandom(_NONCE)
            conn.sendall(nonce + _proof(key, b"accept", their_nonce, nonce, rank, peer))
            answer = _recv_bytes(conn, 32)
            if not hmac.compare_digest(answer, _proof(key, b"connect", nonce, their_nonce,
                                                      rank, peer)):
                raise ConnectionError("the peer does not hold this group's key")
        except (OSError, struct.error):
            conn.close()
            return None
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return int(peer)

    @staticmethod
    def _connect(host: str, port: int, rank: int, peer: int, key: bytes) -> socket.socket:
        try:
            sock = socket.create_connection((host, port), timeout=_HANDSHAKE_S)
        except OSError as exc:
            raise WorkerLost(f"rank {rank} could not connect to rank {peer} at {host}:{port}:"
                             f" {exc}", rank=peer) from exc
        try:
            nonce = os.urandom(_NONCE)
            sock.sendall(_HELLO.pack(_MAGIC, rank, nonce))
            reply = _recv_bytes(sock, _NONCE + 32)
            their_nonce, proof = reply[:_NONCE], reply[_NONCE:]
            if not hmac.compare_digest(proof, _proof(key, b"accept", nonce, their_nonce,
                                                     peer, rank)):
                raise ConnectionError(f"rank {peer} at {host}:{port} does not hold this"
                                      " group's key")
            sock.sendall(_proof(key, b"connect", their_nonce, nonce, peer, rank))
        except OSError as exc:
            sock.close()
            raise WorkerLost(f"rank {rank} could not authenticate rank {peer}: {exc}",
                             rank=peer) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    # ----------------------------------------------------------------- sending
    def send(self, dst: int, key: str, tensor: torch.Tensor | None, *, command: int | None,
             objects: bool = False, ack: bool = False, wants_ack: bool = False,
             check: Callable[[], None] | None = None) -> None:
        """Write one message (or, ``ack``, the acknowledgement of ``key``) to ``dst``.

        Returns once the bytes are with the kernel; waits only while ``dst`` does not read
        (its reader thread always does, unless it is dead or stopped: ``check`` runs between
        slices and raises for a lost rank).
        """
        name = key.encode()
        if ack or tensor is None:
            meta, body = b"", memoryview(b"")
        else:
            shape = "x".join(map(str, tensor.shape))
            meta = f"{str(tensor.dtype).removeprefix('torch.')};{shape}".encode()
            body = _byte_view(tensor)
        flags = (_OBJECT if objects else 0) | (_WANTS_ACK if wants_ack else 0)
        header = _HEADER.pack(_ACK if ack else _MSG, flags, len(name), len(meta),
                              len(body), _NO_COMMAND if command is None else command)
        sock = self._sockets.get(dst)
        if sock is None:
            raise WorkerLost(f"rank {self.rank} has no connection to rank {dst}", rank=dst)
        with self._send_locks[dst]:
            try:
                self._write(sock, memoryview(header + name + meta), check)
                if len(body):
                    self._write(sock, body, check)
            except OSError as exc:
                raise WorkerLost(f"sending {key!r} to rank {dst} failed: {exc}",
                                 rank=dst) from exc

    def _write(self, sock: socket.socket, view: memoryview,
               check: Callable[[], None] | None) -> None:
        at, next_check = 0, time.monotonic() + _LIVENESS_EVERY_S
        while at < len(view):
            try:
                at += sock.send(view[at:], socket.MSG_DONTWAIT)
                continue
            except BlockingIOError:
                pass
            if self._closing:
                raise Aborted("stopped sending: shutting down")
            waiting = select.poll()  # wait for room, in slices
            waiting.register(sock, select.POLLOUT)
            waiting.poll(_IO_SLICE_S * 1000)
            if check is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + _LIVENESS_EVERY_S
                check()

    # ----------------------------------------------------------------- receiving
    def _read_loop(self, peer: int, sock: socket.socket) -> None:
        _name_os_thread(f"cloche-link<{peer}")
        reader = _Reader(sock)
        try:
            while True:
                if not reader.wait_for(_HEADER.size):
                    raise ConnectionError("the peer closed the connection")
                kind, flags, key_len, meta_len, nbytes, command = _HEADER.unpack(
                    reader.take(_HEADER.size))
                reader.wait_for(key_len + meta_len)
                head = reader.take(key_len + meta_len)
                key = head[:key_len].decode()
                tensor = None
                if kind == _MSG:
                    dtype_name, _, shape_text = head[key_len:].decode().partition(";")
                    shape = tuple(int(s) for s in shape_text.split("x")) if shape_text else ()
                    tensor = torch.empty(shape, dtype=_dtype(dtype_name))
                    body = _byte_view(tensor)
                    if len(body) != nbytes:
                        raise ConnectionError(f"message {key!r}: {nbytes} bytes for a"
                                              f" {dtype_name} tensor of shape {shape}")
                    reader.read_into(body)
                elif kind == _ACK:
                    key = ACK + key
                else:
                    raise ConnectionError(f"a message of unknown kind {kind}")
                with self._cond:
                    if command == _NO_COMMAND or command > self._floor:
                        self._box[peer, key] = (command, tensor, bool(flags & _WANTS_ACK))
                        self._cond.notify_all()
        except Exception as exc:  # noqa: BLE001 - whatever broke it, waiters must hear
            self._mark_dead(peer, f"{type(exc).__name__}: {exc}")

    def _mark_dead(self, peer: int, reason: str) -> None:
        with self._cond:
            if not self._closing:
                self._dead[peer] = reason
            self._cond.notify_all()

    def take(self, src: int, key: str, *, checkpoint: Callable[[bool], None]
             ) -> tuple[int, torch.Tensor | None, bool]:
        """The message ``src`` sent under ``key``, once it is here (command, tensor, whether
        the sender waits for an acknowledgement).

        Blocks on the mailbox in slices; between slices ``checkpoint(slow)`` raises when the
        wait must end (abort, shutdown; with ``slow``, a lost rank).
        """
        next_check = time.monotonic() + _LIVENESS_EVERY_S
        while True:
            with self._cond:
                item = self._box.pop((src, key), None)
                broken = self._dead.get(src) if item is None else None
                if item is None and broken is None:
                    self._cond.wait(_SLICE_S)
                    item = self._box.pop((src, key), None)
            if item is not None:
                return item
            if broken is not None:
                self._explain(src, broken, checkpoint)
            now = time.monotonic()
            slow = now >= next_check
            if slow:
                next_check = now + _LIVENESS_EVERY_S
            checkpoint(slow)

    def _explain(self, src: int, broken: str, checkpoint: Callable[[bool], None]) -> None:
        """Raise for ``src``'s broken connection: liveness's word if it has one soon (a local
        launcher knows the exit code of a rank that died), else the connection's."""
        until = time.monotonic() + _EXPLAIN_S
        while time.monotonic() < until:
            checkpoint(True)
            time.sleep(_SLICE_S)
        raise WorkerLost(f"rank {src} was lost (its connection to rank {self.rank} broke:"
                         f" {broken})", rank=src)

    def drop_through(self, command: int) -> int:
        """Drop every message of commands up to ``command``, now and when it arrives later.

        Returns how many (acknowledgements not counted) were dropped.
        """
        with self._cond:
            self._floor = max(self._floor, command)
            stale = [k for k, (c, _, _) in self._box.items()
                     if c != _NO_COMMAND and c <= self._floor]
            for k in stale:
                del self._box[k]
        return sum(1 for _, key in stale if not key.startswith(ACK))

    def close(self) -> None:
        """Stop the readers and close every connection (peers see this rank as gone)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for sock in self._sockets.values():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for reader in self._readers:
            if reader is not threading.current_thread():
                reader.join(timeout=1)
        for sock in self._sockets.values():
            sock.close()
