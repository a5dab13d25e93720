"""Version skew and TLS mismatches are clear errors that name both sides, not protocol noise.

Protocol versions must match (fatal, ``VersionMismatch``). Python major.minor and cloudpickle
versions only matter for shipped code: a mismatch warns at connect, and shipped code that then
fails to load is a ``UsageError`` that names both sides' versions.
"""

from __future__ import annotations

import socket
import sys
import threading

import pytest
from cloche.client import connect, ship_by_reference
from cloche.errors import AuthError, ConnectionError, UsageError, VersionMismatch
from cloche.wire import codec, frames, handshake
from cloche.wire.transport import FramedSocket

from tests.server.helpers import raw_socket

FAR_FUTURE = 9


def test_a_client_speaking_another_protocol_version_is_refused_naming_both(served):
    hello = codec.encode({"kind": "hello", "proto": FAR_FUTURE, "nonce": bytes(32)})
    with raw_socket(served.address) as sock:
        raw = frames.encode_preamble(len(hello.header), 0) + hello.header
        sock.sendall(raw[:4] + bytes([FAR_FUTURE]) + raw[5:])  # the preamble's version byte
        refusal = FramedSocket(sock).recv()
    assert refusal["kind"] == "refused" and refusal["code"] == "version"
    assert f"version {FAR_FUTURE}" in refusal["reason"]
    assert f"speaks {frames.PROTOCOL_VERSION}" in refusal["reason"]
    with pytest.raises(VersionMismatch, match=f"version {FAR_FUTURE}"):
        handshake.ClientHandshake("t" * 16).receive(refusal)


def test_a_server_speaking_another_protocol_version_is_a_clear_error():
    listener = socket.create_server(("127.0.0.1", 0))

    def old_server():
        conn, _ = listener.accept()
        with conn:
            encoded = codec.encode({"kind": "challenge", "proto": 1, "nonce": bytes(32)})
            raw = frames.encode_preamble(len(encoded.header), 0) + encoded.header
            conn.sendall(raw[:4] + bytes([1]) + raw[5:])
            conn.recv(4096)

    thread = threading.Thread(target=old_server, daemon=True)
    thread.start()
    try:
        with pytest.raises(VersionMismatch, match=r"version 1\b.*speaks " +
                           str(frames.PROTOCOL_VERSION)):
            connect(listener.getsockname(), token="t" * 16, timeout=30)
    finally:
        thread.join(30)
        listener.close()


@pytest.fixture
def client_only_module(tmp_path, monkeypatch):
    """A module that exists on this side only, kept by reference (as if installed here only)."""
    (tmp_path / "only_here_mod.py").write_text("def probe(ctx, x):\n    return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ship_by_reference("only_here_mod")
    import only_here_mod

    yield only_here_mod
    sys.modules.pop("only_here_mod", None)


def test_python_and_cloudpickle_skew_warns_and_names_both_versions_when_code_fails(
        served, monkeypatch, client_only_module):
    real = handshake.local_versions()
    fake = dict(real, python="3.9.0", cloudpickle="1.6.0")
    monkeypatch.setattr(handshake, "local_versions", lambda: fake)
    with pytest.warns(RuntimeWarning, match="Python 3.9.0") as warned:
        model = connect(served.address, token=served.token)
    text = str(warned[0].message)
    assert real["python"] in text and "cloudpickle 1.6.0" in text and real["cloudpickle"] in text
    with model:
        assert model.ping("plain data still works") == "plain data still works"
        with pytest.raises(UsageError) as info:
            model.run("def f():", probes={"embed": client_only_module.probe})
        message = str(info.value)
        assert "cannot be imported here" in message and "only_here_mod" in message
        assert "Python 3.9.0" in message and real["python"] in message
        assert "cloudpickle 1.6.0" in message
        assert model.ping("still connected") == "still connected"


def test_same_versions_do_not_warn(served, recwarn):
    with connect(served.address, token=served.token) as model:
        assert model.ping(1) == 1
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_a_tls_client_on_a_plain_server_is_told_so(served):
    # (a plain client on a TLS server: tests/server/test_cli.py) The TLS client's handshake
    # gets plain cloche bytes back.
    import ssl

    context = ssl.create_default_context()
    with pytest.raises(ConnectionError, match="did not answer in TLS") as info:
        connect(served.address, token=served.token, tls=context, timeout=30)
    assert not isinstance(info.value, AuthError)
    with connect(served.address, token=served.token) as model:
        assert model.ping("plain") == "plain"
