"""Strangers: nothing is unpickled before authentication, refusals are logged, the server goes
on."""

from __future__ import annotations

import pickle
import struct

import msgpack
import pytest
import torch
from cloche.api.requests import Ping
from cloche.client import connect
from cloche.errors import AuthError
from cloche.wire import codec, frames
from cloche.wire.handshake import ClientHandshake

from tests.server.helpers import (
    PeakRss,
    authenticated,
    frame,
    raw_socket,
    read_until_closed,
    unread_by_peer,
    wait_for,
)


class CreateFile:
    """Unpickling this creates a file: the canary of code execution."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_frame_header(path) -> bytes:
    """A msgpack header whose hello carries a pickle field (EXT_PICKLE) that would create
    ``path``."""
    payload = msgpack.packb([pickle.dumps(CreateFile(path)), []])
    hello = {"kind": "hello", "proto": frames.PROTOCOL_VERSION, "nonce": bytes(32),
             "x": msgpack.ExtType(codec.EXT_PICKLE, payload)}
    return msgpack.packb(hello)


def attacks(path):
    header = pickle_frame_header(path)
    raw_pickle = pickle.dumps(CreateFile(path))
    request = msgpack.packb({"kind": "request", "id": 1, "method": "call", "args": [
        msgpack.ExtType(codec.EXT_PICKLE, msgpack.packb([raw_pickle, []]))], "kwargs": {}})
    return {
        # multiprocessing.connection style: a length prefix and a bare pickle
        "bare pickle": struct.pack("!i", len(raw_pickle)) + raw_pickle,
        # a valid cloche frame whose hello carries a pickled field
        "pickle in hello": frames.encode_preamble(len(header), 0) + header,
        # skip the handshake and send a request with pickled code straight away
        "request without handshake": frames.encode_preamble(len(request), 0) + request,
    }


@pytest.mark.parametrize("attack", ["bare pickle", "pickle in hello", "request without handshake"])
def test_unauthenticated_pickle_is_never_loaded(served, tmp_path, attack):
    canary = tmp_path / f"pwned-{attack.replace(' ', '-')}"
    with raw_socket(served.address) as sock:
        sock.sendall(attacks(canary)[attack])
        reply = read_until_closed(sock)
    assert not canary.exists()
    assert b"welcome" not in reply and b"result" not in reply
    assert served.alive()
    with connect(served.address, token=served.token) as model:
        assert model.ping("still here") == "still here"


def test_pickle_after_a_wrong_proof_is_never_loaded(served, tmp_path):
    canary = tmp_path / "pwned-after-auth"
    shake = ClientHandshake("not-the-token")
    with raw_socket(served.address) as sock:
        sock.sendall(frame(shake.start()))
        from cloche.wire.transport import FramedSocket

        framed = FramedSocket(sock)
        auth = shake.receive(framed.recv())
        sock.sendall(frame(auth))
        refusal = framed.recv()
        assert refusal["kind"] == "refused"
        request = msgpack.packb({"kind": "request", "id": 1, "method": "call", "args": [
            msgpack.ExtType(codec.EXT_PICKLE,
                            msgpack.packb([pickle.dumps(CreateFile(canary)), []]))]})
        try:
            sock.sendall(frames.encode_preamble(len(request), 0) + request)
        except OSError:
            pass  # the server closed already: good
        read_until_closed(sock)
    assert not canary.exists()
    assert served.alive()


def test_wrong_token_is_refused(served):
    with pytest.raises(AuthError, match="refused"):
        connect(served.address, token="wrong")
    with connect(served.address, token=served.token) as model:
        assert model.ping(1) == 1


def test_oversize_frame_before_auth_is_refused_without_reading_it(served):
    with raw_socket(served.address) as sock:
        sock.sendall(frames.encode_preamble(100, 1 << 40))
        reply = read_until_closed(sock)
    assert b"refused" in reply
    assert served.alive()


def test_silent_peer_is_dropped_after_the_handshake_timeout_not_blocking_others(served):
    with raw_socket(served.address) as idle:
        with connect(served.address, token=served.token) as model:
            assert model.ping(2) == 2
        idle.setblocking(False)
        with pytest.raises(BlockingIOError):
            idle.recv(1)  # still open, and nothing was sent to a peer that said nothing


def test_frames_announced_but_never_sent_cost_the_server_no_memory(served):
    # Each connection announces a frame and stalls. Reserving the announced header up front
    # cost 60 MiB per connection before a byte of it arrived; headers now grow as bytes come.
    # Bodies are allocated by the codec only once the header is in, as untouched (lazily
    # committed) tensor memory that is only filled as the body arrives.
    memory = PeakRss(served.proc.pid)
    stalled = []
    try:
        for _ in range(8):
            framed = authenticated(served.address, served.token)
            framed.sock.sendall(frames.encode_preamble(60 * 2**20, 0) + b"\x81")
            stalled.append(framed)
        for _ in range(4):
            encoded = codec.encode({"kind": "request", "id": 1,
                                    "op": Ping(value=torch.empty(2**28, dtype=torch.uint8))})
            framed = authenticated(served.address, served.token)
            framed.sock.sendall(frames.encode_preamble(len(encoded.header), encoded.body_len)
                                + encoded.header + bytes(1000))
            stalled.append(framed)
        # the server has read every byte sent, so it has parsed every announcement
        assert wait_for(lambda: all(unread_by_peer(f.sock) == 0 for f in stalled))
        with connect(served.address, token=served.token) as model:
            assert model.ping("flat") == "flat"
        growth = memory.stop()
        assert growth < 64 * 2**20, f"the server grew by {growth / 2**20:.0f} MiB"
    finally:
        memory.stop()
        for framed in stalled:
            framed.close()
    assert served.alive()
