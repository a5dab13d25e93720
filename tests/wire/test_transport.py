"""Frames over a real socket pair: zero-copy receive, EOF handling, limits."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
import torch
from cloche.errors import ConnectionError, FrameTooLarge, ProtocolError
from cloche.wire import codec, frames
from cloche.wire.transport import FramedSocket


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    left, right = FramedSocket(a), FramedSocket(b)
    yield left, right
    left.close()
    right.close()


def test_large_tensor_round_trip(pair):
    left, right = pair
    tensor = torch.randn(3, 1 << 18)  # 3 MiB: the chunked path
    sender = threading.Thread(target=left.send, args=({"t": tensor, "n": 1},))
    sender.start()
    out = right.recv()
    sender.join()
    assert torch.equal(out["t"], tensor) and out["n"] == 1


def test_clean_eof_between_frames_is_none(pair):
    left, right = pair
    left.send({"a": 1})
    left.close()
    assert right.recv() == {"a": 1}
    assert right.recv() is None


def test_eof_inside_a_frame_is_a_connection_error(pair):
    left, right = pair
    left.sock.sendall(frames.encode_preamble(10, 0) + b"\x81")
    left.close()
    with pytest.raises(ConnectionError, match="middle of a frame"):
        right.recv()


def test_oversize_is_refused_before_reading_the_body(pair):
    left, right = pair
    right.limits = frames.Limits.handshake()
    left.sock.sendall(frames.encode_preamble(1, 1 << 30))
    with pytest.raises(FrameTooLarge):
        right.recv()


def test_garbage_is_a_protocol_error(pair):
    left, right = pair
    left.sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError):
        right.recv()


def test_bad_version_is_a_protocol_error(pair):
    left, right = pair
    left.sock.sendall(b"CLCH" + bytes([7, 0, 0, 0]) + struct.pack(">II", 1, 0) + b"\xc0")
    with pytest.raises(ProtocolError, match="version 7"):
        right.recv()


def test_a_big_header_arrives_whole_through_the_growing_reader(pair):
    left, right = pair
    message = {"blob": bytes(range(256)) * 12289, "text": "x" * 70000, "n": 3}  # ~3.2 MB
    sender = threading.Thread(target=left.send, args=(message,))
    sender.start()
    assert right.recv() == message
    sender.join()


def test_a_deadline_bounds_a_whole_exchange_not_each_read(pair):
    import time

    left, right = pair
    right.deadline = time.monotonic() + 0.3
    left.sock.sendall(frames.encode_preamble(10, 0))  # a frame that never finishes
    with pytest.raises(ConnectionError, match="timed out"):
        right.recv()
    right.deadline = None
    right.sock.settimeout(None)


def test_send_nowait_sends_a_small_frame_whole(pair):
    left, right = pair
    assert left.send_nowait(codec.encode({"a": torch.arange(4)})) is None
    assert torch.equal(right.recv()["a"], torch.arange(4))


def test_send_nowait_on_a_full_socket_returns_what_is_left_and_send_raw_completes_it(pair):
    left, right = pair
    left.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    right.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    first = codec.encode({"n": 0, "t": torch.arange(8000, dtype=torch.int32)})  # 32 KB
    rests = []
    for n in range(16):  # nobody reads: the socket fills up
        rest = left.send_nowait(first if n == 0 else codec.encode({"n": n}))
        rests.append(rest)
        if rest is not None:
            break
    rest = rests[-1]
    assert rest is not None, "a 4 KiB socket buffer took 16 frames without reading"
    received = []
    reader = threading.Thread(target=lambda: received.extend(right.recv() for _ in rests))
    reader.start()
    if isinstance(rest, bytes):  # the frame went out in part: the rest must follow at once
        left.send_raw(rest)
    else:  # nothing went: the frame is still whole
        left.send_encoded(rest)
    reader.join(timeout=60)
    assert [m["n"] for m in received] == list(range(len(rests)))
    assert torch.equal(received[0]["t"], torch.arange(8000, dtype=torch.int32))


def test_send_nowait_leaves_big_frames_to_the_blocking_path(pair):
    left, _ = pair
    big = codec.encode({"t": torch.zeros(1 << 16)})  # 256 KiB
    assert left.send_nowait(big) is big


class _CountingSocket(socket.socket):
    """A socket that records each ``recv_into``: whether it read into a plain bytearray (the
    read-ahead buffer, the preamble and header) or into a tensor's memory, and how much."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(fileno=sock.detach())
        self.reads: list[tuple[bool, int]] = []

    def recv_into(self, buffer, nbytes: int = 0, flags: int = 0) -> int:  # type: ignore[override]
        got = super().recv_into(buffer, nbytes, flags)
        self.reads.append((isinstance(memoryview(buffer).obj, bytearray), got))
        return got


def test_small_frames_already_sent_arrive_in_one_read_and_in_order():
    a, b = socket.socketpair()
    counting = _CountingSocket(b)
    left, right = FramedSocket(a), FramedSocket(counting)
    try:
        messages = [{"n": i, "t": torch.arange(i + 3)} for i in range(3)]
        for message in messages:
            left.send(message)
        for message in messages:
            out = right.recv()
            assert out["n"] == message["n"] and torch.equal(out["t"], message["t"])
        assert len(counting.reads) == 1  # three frames, preamble + header + body each
    finally:
        left.close()
        right.close()


def test_a_big_body_after_a_small_frame_is_read_straight_into_the_tensor():
    a, b = socket.socketpair()
    counting = _CountingSocket(b)
    left, right = FramedSocket(a), FramedSocket(counting)
    try:
        tensor = torch.randn(3, 1 << 18)  # 3 MiB
        after = torch.arange(5)

        def send() -> None:
            left.send({"small": 1})
            left.send({"t": tensor})
            left.send({"after": after})

        sender = threading.Thread(target=send)
        sender.start()
        assert right.recv() == {"small": 1}
        assert torch.equal(right.recv()["t"], tensor)
        assert torch.equal(right.recv()["after"], after)
        sender.join()
        through_buffer = sum(n for plain, n in counting.reads if plain)
        straight = sum(n for plain, n in counting.reads if not plain)
        assert straight >= tensor.nbytes - 2 * 64 * 1024  # at most the ends were copied
        assert through_buffer <= 3 * 64 * 1024
    finally:
        left.close()
        right.close()
