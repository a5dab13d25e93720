"""The challenge-response handshake, driven as pure state machines."""

from __future__ import annotations

import pytest
from cloche.errors import AuthError, ProtocolError
from cloche.wire.handshake import ClientHandshake, ServerHandshake


def run(client: ClientHandshake, server: ServerHandshake) -> dict:
    hello = client.start()
    challenge = server.receive(hello)
    auth = client.receive(challenge)
    welcome = server.receive(auth)
    assert client.receive(welcome) is None
    return auth


def test_same_token_authenticates_both_ways():
    client, server = ClientHandshake("s3cret", session="abc"), ServerHandshake("s3cret")
    auth = run(client, server)
    assert client.done and server.done and server.session == "abc"
    assert "s3cret" not in repr(auth)  # only a proof travels


def test_wrong_token_is_refused_by_the_server():
    client, server = ClientHandshake("wrong"), ServerHandshake("right")
    auth = client.receive(server.receive(client.start()))
    with pytest.raises(AuthError):
        server.receive(auth)
    assert not server.done
    with pytest.raises(AuthError, match="refused"):
        client.receive(ServerHandshake.refusal("authentication failed"))


def test_client_refuses_a_server_without_the_token():
    client = ClientHandshake("token")
    impostor = ServerHandshake("other")
    auth = client.receive(impostor.receive(client.start()))
    impostor._token = b"token"  # accepts anybody, but cannot prove the real token
    welcome = impostor.receive(auth)
    welcome["proof"] = bytes(32)
    with pytest.raises(AuthError, match="could not prove"):
        client.receive(welcome)


def test_replayed_proof_fails_against_a_fresh_nonce():
    client, server = ClientHandshake("t"), ServerHandshake("t")
    auth = run(client, server)
    fresh = ServerHandshake("t")
    fresh.receive(ClientHandshake("x").start())
    with pytest.raises(AuthError):
        fresh.receive(auth)


@pytest.mark.parametrize(
    "msg",
    [
        {"kind": "auth", "proof": b"x"},
        {"kind": "hello", "proto": 1, "nonce": b"short"},
        {"kind": "hello", "proto": 9, "nonce": bytes(32)},
        {"kind": "hello", "proto": 1},
        ["not", "a", "map"],
        None,
    ],
)
def test_out_of_shape_hellos_are_protocol_errors(msg):
    with pytest.raises(ProtocolError):
        ServerHandshake("t").receive(msg)


def test_empty_token_is_refused():
    with pytest.raises(AuthError):
        ServerHandshake("")
