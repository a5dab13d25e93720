"""The challenge-response handshake, driven as pure state machines."""

from __future__ import annotations

import pytest
from cloche.errors import AuthError, ConnectionError, ProtocolError, VersionMismatch
from cloche.wire.frames import PROTOCOL_VERSION
from cloche.wire.handshake import ClientHandshake, ServerHandshake, code_skew, local_versions


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
    impostor._tokens = {"": b"token"}  # accepts anybody, but cannot prove the real token
    welcome = impostor.receive(auth)
    welcome["proof"] = bytes(32)
    with pytest.raises(AuthError, match="could not prove"):
        client.receive(welcome)


def test_the_proof_names_the_principal_whose_token_it_is():
    tokens = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}
    for name, token in tokens.items():
        client, server = ClientHandshake(token), ServerHandshake(tokens)
        run(client, server)
        assert server.done and server.principal == name and client.done
    client, server = ClientHandshake("carol-token-0123456789"), ServerHandshake(tokens)
    with pytest.raises(AuthError):
        run(client, server)
    assert server.principal is None and not server.done


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
        {"kind": "hello", "proto": PROTOCOL_VERSION, "nonce": b"short"},
        {"kind": "hello", "proto": 9, "nonce": bytes(32)},
        {"kind": "hello", "proto": PROTOCOL_VERSION, "nonce": bytes(32), "versions": "3.11"},
        {"kind": "hello", "proto": PROTOCOL_VERSION},
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


def test_hello_and_welcome_carry_the_versions_and_each_side_keeps_the_others():
    client, server = ClientHandshake("t"), ServerHandshake("t")
    hello = client.start()
    assert hello["versions"] == local_versions()
    assert set(hello["versions"]) == {"cloche", "python", "cloudpickle"}
    challenge = server.receive(hello)
    assert "versions" not in challenge  # nothing about the server before authentication
    welcome = server.receive(client.receive(challenge))
    assert welcome["versions"] == local_versions()
    client.receive(welcome)
    assert server.peer_versions == client.peer_versions == local_versions()


@pytest.mark.parametrize(("code", "error"), [
    ("auth", AuthError), (None, AuthError), ("backoff", AuthError), ("busy", ConnectionError),
    ("tls", ConnectionError), ("version", VersionMismatch), ("protocol", ProtocolError),
])
def test_a_refusal_becomes_the_error_its_code_says(code, error):
    refusal = {"kind": "refused", "reason": "because"}
    if code is not None:
        refusal["code"] = code
    with pytest.raises(error, match="because") as info:
        ClientHandshake("t").receive(refusal)
    if error is ConnectionError:
        assert not isinstance(info.value, AuthError)


def test_another_protocol_version_in_a_hello_is_a_version_mismatch_naming_both():
    with pytest.raises(VersionMismatch, match=f"protocol 9, this side speaks {PROTOCOL_VERSION}"):
        ServerHandshake("t").receive({"kind": "hello", "proto": 9, "nonce": bytes(32)})


def test_code_skew_names_both_sides():
    mine = {"cloche": "0.1.0", "python": "3.11.7", "cloudpickle": "3.1.3"}
    assert code_skew(mine, dict(mine, python="3.11.2")) is None  # patch releases agree
    assert code_skew(mine, {}) is None  # a client in another language ships no code
    text = code_skew(mine, dict(mine, python="3.12.1", cloudpickle="3.0.0"))
    assert text is not None
    assert "Python 3.12.1" in text and "Python 3.11.7" in text and "cloudpickle 3.0.0" in text
