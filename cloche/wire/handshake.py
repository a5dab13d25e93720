"""The authentication handshake: mutual challenge-response on a shared token.

Nothing but these four small messages is accepted before it completes, and none of them can
carry code (the server decodes them with ``allow_code=False`` and a 4 KiB frame limit)::

    1. client -> server  hello     {proto, nonce: Nc (32 random bytes)}
    2. server -> client  challenge {proto, nonce: Ns (32 random bytes)}
    3. client -> server  auth      {proof: HMAC(token, "cloche-v1/client\\0" Ns Nc), session}
    4. server -> client  welcome   {proof: HMAC(token, "cloche-v1/server\\0" Nc Ns), session, info}
       or                refused   {reason}, and the server closes the connection

HMAC is HMAC-SHA256, proofs are compared with :func:`hmac.compare_digest`. The client checks the
server's proof too, so it never ships code to a peer that does not know the token. The two
proofs use different labels, so a proof obtained from one side cannot be replayed to the other.

Pure state machines: feed them decoded messages, send what they return.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

from cloche.errors import AuthError, ProtocolError
from cloche.wire import messages
from cloche.wire.frames import PROTOCOL_VERSION

__all__ = ["NONCE_SIZE", "ClientHandshake", "ServerHandshake", "client_proof", "server_proof"]

NONCE_SIZE = 32
_CLIENT_LABEL = b"cloche-v1/client\x00"
_SERVER_LABEL = b"cloche-v1/server\x00"
_MAX_SESSION_LEN = 128


def _key(token: str | bytes) -> bytes:
    key = token.encode() if isinstance(token, str) else bytes(token)
    if not key:
        raise AuthError("an empty token is not allowed")
    return key


def client_proof(token: str | bytes, server_nonce: bytes, client_nonce: bytes) -> bytes:
    return hmac.new(_key(token), _CLIENT_LABEL + server_nonce + client_nonce,
                    hashlib.sha256).digest()


def server_proof(token: str | bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return hmac.new(_key(token), _SERVER_LABEL + client_nonce + server_nonce,
                    hashlib.sha256).digest()


def _field(msg: Any, kind: str, name: str, kinds: type | tuple[type, ...]) -> Any:
    if type(msg) is not dict or msg.get("kind") != kind:
        got = msg.get("kind") if type(msg) is dict else type(msg).__name__
        raise ProtocolError(f"handshake expected {kind!r}, got {got!r}"[:120])
    value = msg.get(name)
    if not isinstance(value, kinds):
        raise ProtocolError(f"handshake message {kind!r} has a bad {name!r} field")
    return value


def _nonce(msg: Any, kind: str) -> bytes:
    if type(msg) is dict and msg.get("proto") != PROTOCOL_VERSION and msg.get("kind") == kind:
        raise ProtocolError(
            f"peer speaks cloche protocol {msg.get('proto')!r}, this side speaks {PROTOCOL_VERSION}"
        )
    nonce = _field(msg, kind, "nonce", bytes)
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"a nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    return nonce


class ServerHandshake:
    """Server side. ``receive`` returns the reply to send; after ``done`` the peer is trusted.

    A wrong proof raises :class:`AuthError`; the caller sends :meth:`refusal` and closes.
    """

    def __init__(self, token: str | bytes, *, nonce: bytes | None = None) -> None:
        self._token = _key(token)
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._client_nonce: bytes | None = None
        self.done = False
        self.session: str | None = None

    def receive(self, msg: Any) -> dict:
        if self.done:
            raise ProtocolError("handshake already finished")
        if self._client_nonce is None:
            self._client_nonce = _nonce(msg, messages.HELLO)
            return {"kind": messages.CHALLENGE, "proto": PROTOCOL_VERSION, "nonce": self._nonce}
        proof = _field(msg, messages.AUTH, "proof", bytes)
        session = msg.get("session")
        if session is not None and (not isinstance(session, str)
                                    or len(session) > _MAX_SESSION_LEN):
            raise ProtocolError("bad session id in the handshake")
        expected = client_proof(self._token, self._nonce, self._client_nonce)
        if not hmac.compare_digest(proof, expected):
            raise AuthError("authentication failed: wrong token")
        self.done = True
        self.session = session
        return {
            "kind": messages.WELCOME,
            "proto": PROTOCOL_VERSION,
            "proof": server_proof(self._token, self._client_nonce, self._nonce),
        }

    @staticmethod
    def refusal(reason: str, code: str = "auth") -> dict:
        """``code`` says what kind of refusal it is (see ``REFUSAL_CODES``)."""
        return {"kind": messages.REFUSED, "reason": reason, "code": code}


class ClientHandshake:
    """Client side: ``start()`` gives the hello; feed each server message to ``receive``."""

    def __init__(
        self, token: str | bytes, *, session: str | None = None, nonce: bytes | None = None
    ) -> None:
        self._token = _key(token)
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._server_nonce: bytes | None = None
        self._session = session
        self.done = False
        self.welcome: dict | None = None

    def start(self) -> dict:
        return {"kind": messages.HELLO, "proto": PROTOCOL_VERSION, "nonce": self._nonce}

    def receive(self, msg: Any) -> dict | None:
        if type(msg) is dict and msg.get("kind") == messages.REFUSED:
            reason = msg.get("reason")
            reason = reason if isinstance(reason, str) else "?"
            raise AuthError(f"server refused the connection: {reason}")
        if self._server_nonce is None:
            self._server_nonce = _nonce(msg, messages.CHALLENGE)
            return {
                "kind": messages.AUTH,
                "proof": client_proof(self._token, self._server_nonce, self._nonce),
                "session": self._session,
            }
        proof = _field(msg, messages.WELCOME, "proof", bytes)
        expected = server_proof(self._token, self._nonce, self._server_nonce)
        if not hmac.compare_digest(proof, expected):
            raise AuthError("the server could not prove it knows the token; not sending anything")
        self.done = True
        self.welcome = msg
        return None
