"""Hypothesis-generated malformed frames: each gets an error or a closed connection, and the
server keeps serving normal clients."""

from __future__ import annotations

import socket
import struct

import msgpack
from cloche.api.requests import Ping
from cloche.client import connect
from cloche.model.points import ProbePoint
from cloche.wire import frames
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.helpers import authenticated, raw_socket, read_until_closed

MAGIC = frames.MAGIC


def preamble(version=frames.PROTOCOL_VERSION, flags=0, header_len=1, body_len=0) -> bytes:
    return MAGIC + struct.pack(">BBHII", version, flags, 0, header_len, body_len)


header_bytes = st.one_of(
    st.binary(min_size=1, max_size=64),  # bad msgpack
    # not a map
    st.builds(lambda v: msgpack.packb(v), st.integers(-(2**63), 2**64 - 1) | st.text(max_size=10)),
    st.builds(lambda code, data: msgpack.packb(msgpack.ExtType(code, data)),
              st.integers(0, 127), st.binary(max_size=16)),  # ext types with junk payloads
)

malformed = st.one_of(
    st.binary(min_size=1, max_size=64),  # garbage from the first byte
    st.builds(lambda v, h: preamble(version=v, header_len=len(h)) + h,
              st.integers(0, 255).filter(lambda v: v != frames.PROTOCOL_VERSION),
              header_bytes),  # wrong version
    st.builds(lambda h, extra: preamble(header_len=len(h) + extra) + h,
              header_bytes, st.integers(1, 100)),  # header shorter than announced
    st.builds(lambda h, body: preamble(header_len=len(h), body_len=body) + h,
              header_bytes, st.integers(1, 2**32 - 2)),  # body not accounted for / oversize
    st.builds(lambda n: preamble(header_len=n), st.integers(5000, 2**32 - 1)),  # oversize header
    st.builds(lambda h: preamble(header_len=len(h)) + h, header_bytes),  # bad header, right size
    st.builds(lambda f: preamble(flags=f), st.integers(1, 255)),  # reserved bits
)


def assert_refused(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)  # a frame cut short: the server sees EOF mid-frame
    except OSError:
        pass  # already closed by the server
    sock.settimeout(15)
    read_until_closed(sock)  # returns once the server closes (or the timeout: then it hung)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed)
def test_malformed_frames_before_auth(served, data):
    with raw_socket(served.address) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # closed before we finished: refused
        assert_refused(sock)
    assert served.alive()


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(malformed)
def test_malformed_frames_after_auth(served, data):
    framed = authenticated(served.address, served.token)
    try:
        try:
            framed.sock.sendall(data)
        except OSError:
            pass
        assert_refused(framed.sock)
    finally:
        framed.close()
    assert served.alive()


def test_truncated_buffers_after_auth_close_the_connection(served):
    framed = authenticated(served.address, served.token)
    header = msgpack.packb({"kind": "request", "id": 1, "op": msgpack.ExtType(9, msgpack.packb([
        "cloche.api.requests:Ping",
        {"value": msgpack.ExtType(2, msgpack.packb(["float32", [1000], 0]))}]))})
    framed.sock.sendall(frames.encode_preamble(len(header), 4000) + header + b"\0" * 100)
    assert_refused(framed.sock)
    framed.close()


def _frame(message: dict) -> bytes:
    header = msgpack.packb(message)
    return frames.encode_preamble(len(header), 0) + header


def test_bad_requests_in_good_frames_get_errors_and_the_connection_lives(served):
    framed = authenticated(served.address, served.token)
    try:
        for bad in [{"kind": "request", "id": -1, "op": Ping(value=1)},
                    {"kind": "request", "id": 5},
                    {"kind": "request", "id": 6, "op": "ping"},
                    {"kind": "nonsense"}, [1, 2, 3]]:
            framed.send(bad)
            reply = framed.recv()
            assert reply["kind"] == "error" and reply["error"]["type"] == "ProtocolError"
        # a record on the wire's allow-list that is not a request
        framed.send({"kind": "request", "id": 7, "op": ProbePoint("embed", "embed", None)})
        assert framed.recv()["error"]["type"] == "UsageError"
        framed.send({"kind": "request", "id": 8, "op": Ping(value="ok")})
        while (reply := framed.recv())["kind"] == "event":
            pass
        assert reply == {"kind": "result", "id": 8, "value": "ok"}
        # a record type off the allow-list is not built: the peer is told, then disconnected
        framed.sock.sendall(_frame({"kind": "request", "id": 9, "op": msgpack.ExtType(
            9, msgpack.packb(["cloche.api.model:Model", {}]))}))
        reply = framed.recv()
        assert reply["error"]["type"] == "ProtocolError"
        assert "not allowed" in reply["error"]["message"]
        assert_refused(framed.sock)
    finally:
        framed.close()


def test_normal_client_after_the_storm(served):
    with connect(served.address, token=served.token) as model:
        assert model.run("def f():").logits.shape[0] == 1
