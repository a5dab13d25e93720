"""Raw-socket helpers for talking to a server below the client library."""

from __future__ import annotations

import socket

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
