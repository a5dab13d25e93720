"""Shared memory frames (``cloche.wire.shm``) below the connections: negotiation, the codec over
a mapping, the transport on a socket pair, and forged or broken references.

Sender and receiver are this one process (the pid in every reference is ours), which is exactly
the same-host case: ``/proc/<pid>/fd/<n>`` is opened as a peer would.
"""

from __future__ import annotations

import gc
import os
import socket
import threading

import numpy as np
import pytest
import torch
from cloche.errors import ProtocolError
from cloche.wire import codec, frames, messages, shm
from cloche.wire.transport import FramedSocket
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.usefixtures("needs_shared_memory")

BIG = shm.THRESHOLD


def sample_message() -> dict:
    torch.manual_seed(0)
    return {
        "kind": "result", "id": 7,
        "value": {
            "x": torch.randn(300, 257),  # above the threshold on its own
            "b": torch.rand(5) > 0.5,  # a 5-byte buffer: the next one must be realigned
            "half": torch.randn(3, 7).to(torch.bfloat16),
            "ints": torch.arange(11, dtype=torch.int64),
            "empty": torch.empty(0, 4),
            "scalar": torch.tensor(3.5),
            "array": np.arange(13, dtype=np.float32).reshape(13, 1),
            "complex": torch.randn(4, dtype=torch.complex64),
        },
    }


def assert_bitwise(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                           b.view(-1).view(torch.uint8) if b.numel() else b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_bitwise(a[key], b[key])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_bitwise(x, y)
    else:
        assert a == b


def pair(*, shm_both: bool = True) -> tuple[FramedSocket, FramedSocket]:
    """Two framed sockets, ``a`` sending through shared memory to ``b``."""
    left, right = socket.socketpair()
    a, b = FramedSocket(left), FramedSocket(right)
    if shm_both:
        a.shm_sender = shm.Sender()
        b.shm_receiver = shm.Receiver(os.getpid(), max_size=1 << 40)
    return a, b


def exchange(a: FramedSocket, b: FramedSocket, message):
    """``message`` sent by ``a`` (on a thread: a big TCP frame fills the socket buffer) and
    received by ``b``."""
    sender = threading.Thread(target=a.send, args=(message,))
    sender.start()
    try:
        return b.recv()
    finally:
        sender.join()


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------------------ negotiation


def test_an_offer_is_accepted_by_a_process_that_can_open_it():
    offer = shm.Offer()
    try:
        pid, proof = shm.accept_offer(offer.message())
        assert pid == os.getpid()
        assert offer.check(proof)
        assert not offer.check(b"\0" * 32) and not offer.check(None)
    finally:
        offer.close()


def test_an_offer_that_cannot_be_opened_is_a_protocol_error():
    offer = shm.Offer()
    message = offer.message()
    offer.close()  # the fd is gone: as for a peer on another host
    with pytest.raises(ProtocolError):
        shm.accept_offer(message)
    for bad in (None, {"pid": "1", "fd": 3}, {"pid": os.getpid(), "fd": -1},
                {"pid": 0, "fd": 3}, {"pid": os.getpid()}):
        with pytest.raises(ProtocolError):
            shm.accept_offer(bad)


def test_an_offer_must_be_a_sealed_memfd(tmp_path):
    path = tmp_path / "nonce"
    path.write_bytes(b"x" * 32)
    # a plain file of the right size is not an offer
    with open(path, "rb") as handle, pytest.raises(ProtocolError, match="sealed memfd"):
        shm.accept_offer({"pid": os.getpid(), "fd": handle.fileno()})


# ------------------------------------------------------------------------------- codec


def test_layout_aligns_every_buffer():
    offsets, size = shm.layout([5, 0, 64, 1])
    assert offsets == [0, 64, 64, 128] and size == 129
    assert all(offset % shm.ALIGN == 0 for offset in offsets)


def test_a_message_over_shared_memory_equals_the_tcp_decoding_bit_for_bit():
    message = sample_message()
    a, b = pair()
    try:
        got = exchange(a, b, message)
        a.shm_sender = None  # the same message over the socket
        plain = exchange(a, b, message)
    finally:
        a.close()
        b.close()
    assert_bitwise(got, plain)
    assert_bitwise(got, message)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["float32", "int8", "bool", "float16", "int64"]),
                          st.lists(st.integers(0, 9), max_size=3)), min_size=1, max_size=6))
def test_the_mapped_decoder_matches_the_plain_one(specs):
    tensors = [torch.arange(int(np.prod(shape)), dtype=torch.int64).reshape(shape)
               .to(getattr(torch, dtype)) for dtype, shape in specs]
    encoded = codec.encode({"t": tensors})
    offsets, size = shm.layout([buf.nbytes for buf in encoded.buffers])
    body = bytearray(max(size, 1))
    for buf, offset in zip(encoded.buffers, offsets):
        body[offset:offset + buf.nbytes] = buf
    plain = codec.decode(encoded.header, b"".join(bytes(b) for b in encoded.buffers))
    mapped = codec.decode_header(encoded.header, size, mapped=body).finish()
    assert_bitwise(mapped, plain)


def test_a_buffer_beyond_the_mapping_is_refused():
    encoded = codec.encode({"t": torch.ones(100)})
    with pytest.raises(ProtocolError, match="shared memory frame"):
        codec.decode_header(encoded.header, 399, mapped=bytearray(399))
    with pytest.raises(ProtocolError, match="end at 400"):  # bytes no buffer accounts for
        codec.decode_header(encoded.header, 464, mapped=bytearray(464))


# ---------------------------------------------------------------------------- transport


def test_tensors_over_shared_memory_are_writable_and_outlive_the_frame():
    a, b = pair()
    try:
        a.send({"t": torch.arange(BIG // 4, dtype=torch.float32)})
        got = b.recv()["t"]
        gc.collect()
        got.add_(1)  # in place: copy-on-write, the sender's file is untouched
        assert got[:3].tolist() == [1.0, 2.0, 3.0]
        array = got.numpy()
        array[0] = -1
        assert got[0].item() == -1
        assert got.sum().item() == pytest.approx(float(np.arange(1, BIG // 4 + 1).sum() - 2))
    finally:
        a.close()
        b.close()


def test_files_are_given_back_when_unmapped_and_reused():
    a, b = pair()
    sender, receiver = a.shm_sender, b.shm_receiver
    assert sender is not None and receiver is not None
    before = fd_count()
    try:
        for i in range(20):
            a.send({"t": torch.full((BIG // 4 + i,), float(i))})
            got = b.recv()["t"]
            assert got[0].item() == i and got.numel() == BIG // 4 + i
            assert receiver.given_back() == []  # still mapped: not given back
            assert sender.outstanding == 1
            del got
            gc.collect()
            released = receiver.given_back()
            assert len(released) == 1 and sender.release(released[0])
            assert sender.outstanding == 0
        assert sender.files == 1  # one file, grown and rewritten each time
        assert fd_count() <= before + 1
        assert not sender.release(released[0])  # given back twice: refused
    finally:
        a.close()
        b.close()
    assert fd_count() <= before - 2  # the sockets and the pooled file are closed


def test_a_sender_falls_back_to_tcp_when_the_peer_holds_too_many_files():
    a, b = pair()
    try:
        held = [exchange(a, b, {"t": torch.ones(BIG // 4)})["t"] for _ in range(70)]
        assert a.shm_sender is not None and a.shm_sender.outstanding == 64
        assert all(t.sum().item() == BIG // 4 for t in held)
    finally:
        a.close()
        b.close()


def descriptor(fd: int, size: int, reserved: int = 0) -> bytes:
    return shm._DESCRIPTOR.pack(fd, reserved, size)


@pytest.mark.parametrize("case", ["closed fd", "not a memfd", "too small", "unsealed"])
def test_a_forged_reference_fails_that_frame_and_the_stream_stays_in_sync(case, tmp_path):
    left, right = socket.socketpair()
    b = FramedSocket(right)
    b.shm_receiver = shm.Receiver(os.getpid(), max_size=1 << 40)
    opened = []
    if case == "closed fd":
        fd = os.open(os.devnull, os.O_RDONLY)
        os.close(fd)
        desc = descriptor(fd, 400)
    elif case == "not a memfd":
        path = tmp_path / "file"
        path.write_bytes(b"\0" * 400)
        fd = os.open(path, os.O_RDONLY)
        opened.append(fd)
        desc = descriptor(fd, 400)
    else:
        fd = os.memfd_create("forged", os.MFD_ALLOW_SEALING)
        opened.append(fd)
        os.ftruncate(fd, 100 if case == "too small" else 400)
        if case == "too small":
            shm._seal(fd, shm._FRAME_SEALS)
        desc = descriptor(fd, 400)
    header = messages.result(5, {"t": torch.ones(100)})
    try:
        left.sendall(_frame_with_tensor_ref(header, desc))
        left.sendall(_plain_frame({"kind": "result", "id": 6, "value": "next"}))
        with pytest.raises(shm.ShmFrameError) as info:
            b.recv()
        assert info.value.peek["id"] == 5 and info.value.peek["value"] == {"t": None}
        assert b.recv()["id"] == 6  # the frame was consumed whole
        assert b.shm_receiver.given_back() == [fd]  # the peer may close it
    finally:
        for each in opened:
            os.close(each)
        left.close()
        b.close()


def _frame_with_tensor_ref(message, desc: bytes) -> bytes:
    """A shared memory frame whose header is ``message`` (tensors referenced, not sent)."""
    encoded = codec.encode(message)
    return (frames.encode_preamble(len(encoded.header), len(desc), frames.FLAG_SHM)
            + encoded.header + desc)


def _plain_frame(message) -> bytes:
    encoded = codec.encode(message)
    body = b"".join(bytes(buf) for buf in encoded.buffers)
    return frames.encode_preamble(len(encoded.header), len(body)) + encoded.header + body


def test_a_descriptor_that_overstates_the_file_is_refused():
    sender = shm.Sender()
    left, right = socket.socketpair()
    b = FramedSocket(right)
    b.shm_receiver = shm.Receiver(os.getpid(), max_size=1 << 40)
    try:
        desc = sender.write(codec.encode({"t": torch.ones(BIG // 4)}).buffers)
        assert desc is not None
        fd, _, size = shm._DESCRIPTOR.unpack(desc)
        # a header that claims more bytes than the file holds, with a matching descriptor
        left.sendall(_frame_with_tensor_ref({"t": torch.ones(BIG // 2)}, descriptor(fd, size * 2)))
        with pytest.raises(ProtocolError):
            b.recv()
        # and one whose tensors reach past the mapped size
        left.sendall(_frame_with_tensor_ref({"t": torch.ones(BIG // 2)}, desc))
        with pytest.raises(ProtocolError, match="shared memory frame"):
            b.recv()
    finally:
        sender.close()
        left.close()
        b.close()


def test_flagged_frames_are_refused_where_shared_memory_was_not_negotiated():
    left, right = socket.socketpair()
    b = FramedSocket(right)
    try:
        left.sendall(_frame_with_tensor_ref({"t": torch.ones(4)}, descriptor(3, 16)))
        with pytest.raises(ProtocolError, match="reserved preamble bits"):
            b.recv()
    finally:
        left.close()
        b.close()


def test_reserved_descriptor_bits_are_refused():
    receiver = shm.Receiver(os.getpid(), max_size=1 << 40)
    with pytest.raises(ProtocolError):
        receiver.map(descriptor(3, 16, reserved=1))
    with pytest.raises(ProtocolError):
        receiver.map(b"short")
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        shm.Receiver(os.getpid(), max_size=10).map(descriptor(3, 16))


# Python 3.12+ warns on fork() in a process with threads; this child only reads and exits
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_file_mapped_when_the_process_forked_is_never_given_back():
    a, b = pair()
    try:
        got = exchange(a, b, {"t": torch.ones(BIG // 4)})["t"]
        pid = os.fork()
        if pid == 0:  # the child may still read the mapping: it must never be rewritten
            os._exit(0 if got.sum().item() == BIG // 4 else 1)
        assert os.waitpid(pid, 0)[1] == 0
        del got
        gc.collect()
        assert b.shm_receiver is not None and b.shm_receiver.given_back() == []
        later = exchange(a, b, {"t": torch.ones(BIG // 4)})["t"]
        del later
        gc.collect()
        assert len(b.shm_receiver.given_back()) == 1  # mapped after the fork: given back
    finally:
        a.close()
        b.close()
