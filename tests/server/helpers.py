"""Raw-socket helpers for talking to a server below the client library."""

from __future__ import annotations

import socket
import threading

from cloche.wire import codec, frames
from cloche.wire.handshake import ClientHandshake
from cloche.wire.transport import FramedSocket


def raw_socket(address: str, timeout: float = 10.0) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
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


def authenticated(address: str, token: str) -> FramedSocket:
    """A FramedSocket that has completed the handshake (the welcome is consumed)."""
    framed = FramedSocket(raw_socket(address))
    shake = ClientHandshake(token)
    framed.send(shake.start())
    while not shake.done:
        reply = shake.receive(framed.recv())
        if reply is not None:
            framed.send(reply)
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
