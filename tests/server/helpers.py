"""Raw-socket helpers for talking to a server below the client library."""

from __future__ import annotations

import socket
import threading

from cloche.errors import ConnectionError
from cloche.wire import codec, frames
from cloche.wire.handshake import ClientHandshake
from cloche.wire.transport import FramedSocket


def raw_socket(address: str, timeout: float = 10.0, *, source: str | None = None
               ) -> socket.socket:
    """A TCP connection to ``address``; ``source`` binds the local end first (127.0.0.2 is
    loopback on Linux too, so tests can play a second peer address)."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    return sock


def frame(message) -> bytes:
    encoded = codec.encode(message)
    body = b"".join(bytes(b) for b in encoded.buffers)
    return frames.encode_preamble(len(encoded.header), len(body)) + encoded.header + body


def read_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes the connection (or the timeout)."""
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def authenticated(address: str, token: str, *, source: str | None = None) -> FramedSocket:
    """A FramedSocket that has completed the handshake (the welcome is consumed).

    Raises what the client handshake raises (AuthError for a refusal, ConnectionError...).
    """
    framed = FramedSocket(raw_socket(address, source=source))
    try:
        shake = ClientHandshake(token)
        framed.send(shake.start())
        while not shake.done:
            msg = framed.recv()
            if msg is None:
                raise ConnectionError("the server closed the connection during the handshake")
            reply = shake.receive(msg)
            if reply is not None:
                framed.send(reply)
    except BaseException:
        framed.close()
        raise
    return framed


def hook_count(model) -> int:
    """Hooks attached anywhere in the served model (counted on the server)."""

    def count(m):
        return sum(
            len(mod._forward_hooks) + len(mod._forward_pre_hooks) + len(mod._backward_hooks)
            + len(mod._backward_pre_hooks)
            for mod in m.hf_model.modules()
        )

    return model.call(count)


def server_threads(model) -> int:
    def count(m):
        import threading

        return threading.active_count()

    return model.call(count)


def wait_until(predicate, timeout: float = 120.0, every: float = 0.02) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` s (a bound, not a schedule: it
    returns as soon as the state it checks is reached)."""
    pause = threading.Event()
    for _ in range(int(timeout / every)):
        if predicate():
            return True
        pause.wait(every)
    return bool(predicate())


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _proc_net_address(address: tuple) -> str:
    host, port = address[:2]
    packed = socket.inet_aton(host)
    return f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"


def unread_by_peer(sock: socket.socket) -> int | None:
    """Bytes that reached the other end of this loopback TCP connection but that its process
    has not read yet (its receive queue in /proc/net/tcp); None if the socket is not listed.

    ``unread_by_peer(sock) == 0`` tells a test that the server has consumed everything sent.
    """
    local = _proc_net_address(sock.getpeername())
    remote = _proc_net_address(sock.getsockname())
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1] == local and fields[2] == remote:
                return int(fields[4].split(":")[1], 16)
    return None


class PeakRss:
    """Samples a process's resident memory in the background; ``peak`` is the highest seen."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def stop(self) -> int:
        """The peak growth over the starting memory, in bytes."""
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))
        return self.peak - self.start


class InProcessServer:
    """A :class:`cloche.server.Server` in this process (cheap: no interpreter start-up)."""

    def __init__(self, model, token: str = "in-process-token", **config) -> None:
        from cloche.server import Server, ServerConfig

        self.token = token
        self.server = Server(model, ServerConfig(token=token, port=0, **config))
        host, port = self.server.start()
        self.address = f"{host}:{port}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds (True) or a generous deadline passes (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
