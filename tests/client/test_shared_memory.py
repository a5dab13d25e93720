"""Large results through shared memory between a client and a server on this host.

Against a server in this process and one in a subprocess (``cloche serve``): the fast path is
negotiated and used, results equal the TCP path's bit for bit, either side can turn it off,
a fetched tensor is an ordinary writable tensor, the server's descriptors do not pile up, and
a peer without the feature (no ``shm`` in its hello) still connects.
"""

from __future__ import annotations

import gc
import os

import cloche
import pytest
import torch
from cloche.api import requests as rq
from cloche.client.connection import ClientConnection
from cloche.errors import ProtocolError
from cloche.wire import codec, frames, messages, shm
from cloche.wire.handshake import ClientHandshake, ServerHandshake
from cloche.wire.transport import FramedSocket

from tests.server.helpers import InProcessServer, raw_socket, wait_for

pytestmark = pytest.mark.usefixtures("needs_shared_memory")

N = 1 << 18  # float32 elements: 1 MiB, over the threshold


def make_big(model, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, generator=gen), "ids": torch.arange(n // 3, dtype=torch.int64),
            "small": torch.ones(3)}


def in_shared_frame(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s memory is a mapping of a server's shared memory frame file."""
    address = tensor.data_ptr()
    with open("/proc/self/maps") as maps:
        for line in maps:
            span = line.split(maxsplit=1)[0]
            start, end = (int(part, 16) for part in span.split("-"))
            if start <= address < end:
                return "memfd:cloche-frame" in line
    return False


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def local(server_model_dir):
    return cloche.load(server_model_dir)


@pytest.fixture
def server(local):
    with InProcessServer(local) as running:
        yield running


def test_large_results_arrive_through_shared_memory_and_equal_tcp(server):
    fast = cloche.connect(server.address, token=server.token)
    plain = cloche.connect(server.address, token=server.token, shared_memory=False)
    try:
        got = fast.call(make_big, N, 1)
        expected = plain.call(make_big, N, 1)
        assert in_shared_frame(got["x"]) and in_shared_frame(got["ids"])
        assert not in_shared_frame(expected["x"])
        for key in expected:
            assert got[key].dtype == expected[key].dtype
            assert torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8))
        small = fast.call(lambda model: torch.ones(10))  # under the threshold: plain TCP
        assert not in_shared_frame(small) and small.sum().item() == 10
    finally:
        fast.close()
        plain.close()


def test_a_fetched_tensor_is_writable_and_later_replies_leave_it_alone(server):
    model = cloche.connect(server.address, token=server.token)
    try:
        first = model.call(make_big, N, 2)["x"]
        reference = first.clone()
        first.add_(1)  # in place, copy-on-write
        array = first.numpy()
        array[:3] = 0
        assert first[:3].tolist() == [0.0, 0.0, 0.0]
        assert torch.equal(first[3:], reference[3:] + 1)
        for seed in range(3, 8):  # later replies must not reuse the file under `first`
            later = model.call(make_big, N, seed)["x"]
            assert torch.equal(later, make_big(None, N, seed)["x"])
            del later
            gc.collect()
        assert torch.equal(first[3:], reference[3:] + 1)
        again = model.call(make_big, N, 2)["x"]  # the server's copy was not touched
        assert torch.equal(again, reference)
    finally:
        model.close()


def test_the_client_can_turn_it_off(server, monkeypatch):
    monkeypatch.setenv("CLOCHE_SHARED_MEMORY", "0")
    model = cloche.connect(server.address, token=server.token)
    try:
        got = model.call(make_big, N, 1)
        assert not in_shared_frame(got["x"])
        assert torch.equal(got["x"], make_big(None, N, 1)["x"])
    finally:
        model.close()


def test_the_server_can_turn_it_off(local):
    with InProcessServer(local, shared_memory=False) as running:
        host, port = running.address.rsplit(":", 1)
        conn = ClientConnection(host, int(port), token=running.token)  # asks for it
        try:
            assert not conn.shared_memory
            got = conn.submit(rq.Call(fn=make_big, args=(N, 1))).result(60)
            assert not in_shared_frame(got["x"])
            assert torch.equal(got["x"], make_big(None, N, 1)["x"])
        finally:
            conn.close()


def test_the_server_does_not_keep_descriptors(local):
    before = fd_count()  # the server runs in this process: its descriptors are ours
    with InProcessServer(local) as running:
        model = cloche.connect(running.address, token=running.token)
        for seed in range(60):
            got = model.call(make_big, N, seed)
            assert in_shared_frame(got["x"])
            del got
            gc.collect()
        # the server holds at most its reusable pool beside the sockets
        assert fd_count() <= before + 2 + 2 + 8
        model.close()
        assert wait_for(lambda: fd_count() <= before + 2)  # listening socket, its accept wake-up
    assert wait_for(lambda: fd_count() <= before)


def test_a_server_in_a_subprocess_sends_through_shared_memory(served):
    fast = cloche.connect(served.address, token=served.token)
    plain = cloche.connect(served.address, token=served.token, shared_memory=False)
    try:
        got = fast.call(make_big, N, 4)
        expected = plain.call(make_big, N, 4)
        assert in_shared_frame(got["x"]) and not in_shared_frame(expected["x"])
        for key in expected:
            assert torch.equal(got[key].view(torch.uint8), expected[key].view(torch.uint8))
        got["x"].mul_(2)
        assert torch.equal(got["x"], expected["x"] * 2)
    finally:
        fast.close()
        plain.close()


def inspect_argument(model, tensor, seed):
    """On the server: whether a shipped tensor arrived through shared memory, and intact."""
    gen = torch.Generator().manual_seed(seed)
    expected = torch.randn(tensor.numel(), generator=gen)
    tensor.add_(0)  # writable
    return in_shared_frame(tensor), torch.equal(tensor, expected)


def test_large_requests_travel_through_shared_memory_too(server):
    model = cloche.connect(server.address, token=server.token)
    plain = cloche.connect(server.address, token=server.token, shared_memory=False)
    try:
        for seed in range(5):  # the server gives each file back; the client reuses it
            arg = torch.randn(N, generator=torch.Generator().manual_seed(seed))
            assert model.call(inspect_argument, arg, seed) == (True, True)
        assert plain.call(inspect_argument, arg, 4) == (False, True)
        small = torch.randn(10, generator=torch.Generator().manual_seed(9))
        assert model.call(inspect_argument, small, 9) == (False, True)
    finally:
        model.close()
        plain.close()


def test_a_server_in_a_subprocess_receives_requests_through_shared_memory(served):
    model = cloche.connect(served.address, token=served.token)
    try:
        arg = torch.randn(N, generator=torch.Generator().manual_seed(3))
        assert model.call(inspect_argument, arg, 3) == (True, True)
    finally:
        model.close()


# ------------------------------------------------------------------ protocol, raw frames


def raw_handshake(address: str, token: str, *, shm_field: bool) -> tuple[FramedSocket, dict]:
    framed = FramedSocket(raw_socket(address))
    shake = ClientHandshake(token, shared_memory=shm_field)
    hello = shake.start()
    assert ("shm" in hello) is shm_field
    framed.send(hello)
    while not shake.done:
        reply = shake.receive(framed.recv())
        if reply is not None:
            framed.send(reply)
    assert shake.welcome is not None
    framed.limits = framed.limits.__class__()  # authenticated: large frames
    return framed, shake.welcome


def test_an_old_style_client_without_the_field_gets_plain_frames(server):
    framed, welcome = raw_handshake(server.address, server.token, shm_field=False)
    try:
        assert "shm" not in welcome
        framed.send(messages.request(1, rq.Call(fn=make_big, args=(N, 1)), "none"))
        reply = framed.recv(allow_code=True)  # no receiver: a shared frame would be refused
        assert reply["kind"] == "result"
        assert torch.equal(reply["value"]["x"], make_big(None, N, 1)["x"])
    finally:
        framed.close()


def test_a_wrong_proof_keeps_the_connection_on_tcp(server):
    framed, welcome = raw_handshake(server.address, server.token, shm_field=True)
    try:
        assert set(welcome["shm"]) == {"pid", "fd"}
        framed.send(messages.shm_proof(b"\0" * 32))
        framed.send(messages.request(1, rq.Call(fn=make_big, args=(N, 1)), "none"))
        reply = framed.recv(allow_code=True)
        assert reply["kind"] == "result"
        assert torch.equal(reply["value"]["x"], make_big(None, N, 1)["x"])
    finally:
        framed.close()


def test_releasing_a_file_the_client_does_not_hold_is_a_protocol_error(server):
    framed, welcome = raw_handshake(server.address, server.token, shm_field=True)
    try:
        _, proof = shm.accept_offer(welcome["shm"])
        framed.send(messages.shm_proof(proof))
        framed.send(messages.shm_release([0]))  # stdin: not a file sent to this client
        reply = framed.recv(allow_code=True)
        assert reply["kind"] == "error" and reply["id"] is None
        assert reply["error"]["type"] == "ProtocolError"
        assert framed.recv() is None  # and the server closed this connection
    finally:
        framed.close()
    model = cloche.connect(server.address, token=server.token)  # others are still served
    try:
        assert in_shared_frame(model.call(make_big, N, 1)["x"])
    finally:
        model.close()


def test_the_handshake_fields_are_optional():
    server = ServerHandshake("a-token-of-sixteen-chars")
    hello = ClientHandshake("a-token-of-sixteen-chars").start()
    assert "shm" not in hello
    server.receive(hello)
    assert not server.peer_wants_shm
    server = ServerHandshake("a-token-of-sixteen-chars")
    server.receive(ClientHandshake("a-token-of-sixteen-chars", shared_memory=True).start())
    assert server.peer_wants_shm
    with pytest.raises(ProtocolError):
        shm.accept_offer({"pid": os.getpid(), "fd": "3"})


def test_a_request_with_a_forged_reference_fails_alone(server):
    framed, welcome = raw_handshake(server.address, server.token, shm_field=True)
    offer = shm.Offer()
    try:
        pid, proof = shm.accept_offer(welcome["shm"])
        framed.shm_receiver = shm.Receiver(pid, max_size=1 << 40)
        framed.send(messages.shm_proof(proof, offer.message()))
        answer = framed.recv()
        assert answer["kind"] == "shm" and offer.check(answer["proof"])
        # a request whose tensor is "in" a descriptor this process does not have open
        encoded = codec.encode(messages.request(1, rq.Call(fn=make_big, args=(torch.ones(N),)),
                                                "none"))
        gone = os.open(os.devnull, os.O_RDONLY)
        os.close(gone)
        descriptor = shm._DESCRIPTOR.pack(gone, 0, N * 4)
        framed.sock.sendall(frames.encode_preamble(len(encoded.header), len(descriptor),
                                                   frames.FLAG_SHM)
                            + encoded.header + descriptor)
        reply = framed.recv(allow_code=True)
        assert reply["kind"] == "error" and reply["id"] == 1
        assert reply["error"]["type"] == "ProtocolError"
        framed.send(messages.request(2, rq.Call(fn=make_big, args=(N, 1)), "none"))
        # the connection goes on; the server gives the descriptor back (it could not map it)
        assert framed.recv() == messages.shm_release([gone])
        assert torch.equal(framed.recv(allow_code=True)["value"]["x"], make_big(None, N, 1)["x"])
    finally:
        offer.close()
        framed.close()
