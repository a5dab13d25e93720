"""The authentication handshake: mutual challenge-response on a shared token.

Nothing but these four small messages is accepted before it completes, and none of them can
carry code (the server decodes them with ``allow_code=False`` and a 4 KiB frame limit)::

    1. client -> server  hello     {proto, nonce: Nc (32 random bytes), versions, shm?}
    2. server -> client  challenge {proto, nonce: Ns (32 random bytes)}
    3. client -> server  auth      {proof: HMAC(token, "cloche-v1/client\\0" Ns Nc), session}
    4. server -> client  welcome   {proof: HMAC(token, "cloche-v1/server\\0" Nc Ns), session, info,
                                    versions, shm?}
       or                refused   {reason, code}, and the server closes the connection

HMAC is HMAC-SHA256, proofs are compared with :func:`hmac.compare_digest`. The client checks the
server's proof too, so it never ships code to a peer that does not know the token. The two
proofs use different labels, so a proof obtained from one side cannot be replayed to the other.

``shm`` (optional both ways): a hello's ``1`` asks for same-host shared memory, a welcome's
``{pid, fd}`` offers it (:mod:`cloche.wire.shm`; the connection layers carry it out after the
handshake).

``versions`` ({cloche, python, cloudpickle}) lets each side explain a failure that version skew
causes; the server tells its own only after authentication. A different protocol version is
fatal (:class:`~cloche.errors.VersionMismatch`); Python and cloudpickle versions only matter to
shipped code (:func:`code_skew`). A refusal's ``code`` picks the client's error class.

Pure state machines: feed them decoded messages, send what they return.
"""

from __future__ import annotations

import hashlib
import hmac
import platform
import secrets
from collections.abc import Mapping
from typing import Any

import cloudpickle

from cloche import errors
from cloche._version import __version__
from cloche.errors import AuthError, ProtocolError, VersionMismatch
from cloche.wire import messages
from cloche.wire.frames import PROTOCOL_VERSION

__all__ = ["NONCE_SIZE", "REFUSAL_CODES", "ClientHandshake", "ServerHandshake", "client_proof",
           "code_skew", "local_versions", "server_proof"]

NONCE_SIZE = 32
_CLIENT_LABEL = b"cloche-v1/client\x00"
_SERVER_LABEL = b"cloche-v1/server\x00"
_MAX_SESSION_LEN = 128
_MAX_VERSION_LEN = 64

#: the error a client raises for each refusal code (a missing or unknown code: AuthError)
REFUSAL_CODES: dict[str, type[errors.ClocheError]] = {
    "auth": AuthError,  # wrong token
    "backoff": AuthError,  # too many wrong tokens from this address: wait
    "busy": errors.ConnectionError,  # too many (unauthenticated) connections
    "tls": errors.ConnectionError,  # a plain client on a TLS server
    "version": VersionMismatch,  # another protocol version
    "protocol": ProtocolError,  # not cloche protocol
}


def local_versions() -> dict[str, str]:
    """What this side runs: the cloche release, Python and cloudpickle versions."""
    return {"cloche": __version__, "python": platform.python_version(),
            "cloudpickle": str(cloudpickle.__version__)}


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def code_skew(mine: dict[str, str], theirs: dict[str, str] | None, *, me: str = "this side",
              them: str = "the peer") -> str | None:
    """Why functions pickled on one side may not load on the other, or None.

    Cloudpickled functions carry bytecode: it needs the same Python major.minor, and the same
    cloudpickle release to unpickle. A peer that sends no versions (a client in another
    language ships no code) is never skewed.
    """
    if not theirs:
        return None
    py_a, py_b = mine.get("python", "?"), theirs.get("python", "?")
    cp_a, cp_b = mine.get("cloudpickle", "?"), theirs.get("cloudpickle", "?")
    if _minor(py_a) == _minor(py_b) and cp_a == cp_b:
        return None
    return (f"{them} runs Python {py_b} with cloudpickle {cp_b}, {me} Python {py_a} with"
            f" cloudpickle {cp_a}: functions shipped between them (probes, call, datasets) need"
            " the same Python minor version and the same cloudpickle on both sides, or they"
            " fail to load (or misbehave)")


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
        received = str(msg.get("proto"))[:20]
        raise VersionMismatch(
            f"the peer speaks cloche protocol {received}, this side speaks"
            f" {PROTOCOL_VERSION}: install the same cloche release on both sides",
            received=received, speaks=PROTOCOL_VERSION)
    nonce = _field(msg, kind, "nonce", bytes)
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError(f"a nonce is {NONCE_SIZE} bytes, got {len(nonce)}")
    return nonce


def _versions(msg: dict) -> dict[str, str] | None:
    """The peer's ``versions`` map (optional: clients in other languages may leave it out)."""
    value = msg.get("versions")
    if value is None:
        return None
    if (type(value) is not dict or len(value) > 8
            or not all(type(k) is str and type(v) is str and len(k) <= _MAX_VERSION_LEN
                       and len(v) <= _MAX_VERSION_LEN for k, v in value.items())):
        raise ProtocolError("handshake message has a bad 'versions' field")
    return value


class ServerHandshake:
    """Server side. ``receive`` returns the reply to send; after ``done`` the peer is trusted.

    ``tokens`` is one token, or several by principal name: the client's proof says which one
    it holds (every token is tried, so the time taken does not tell which one came close), and
    ``principal`` names it afterwards. A wrong proof raises :class:`AuthError`; the caller sends
    :meth:`refusal` and closes. ``peer_versions`` is what the client said it runs (None if it
    did not say).
    """

    def __init__(self, tokens: str | bytes | Mapping[str, str | bytes], *,
                 nonce: bytes | None = None) -> None:
        table = tokens if isinstance(tokens, Mapping) else {"": tokens}
        if not table:
            raise AuthError("a server needs at least one token")
        self._tokens = {name: _key(token) for name, token in table.items()}
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._client_nonce: bytes | None = None
        self.done = False
        self.session: str | None = None
        self.principal: str | None = None
        self.peer_versions: dict[str, str] | None = None
        self.peer_wants_shm = False  # the hello asked for shared memory (``cloche.wire.shm``)

    def receive(self, msg: Any) -> dict:
        if self.done:
            raise ProtocolError("handshake already finished")
        if self._client_nonce is None:
            self._client_nonce = _nonce(msg, messages.HELLO)
            self.peer_versions = _versions(msg)
            self.peer_wants_shm = msg.get("shm") == 1
            return {"kind": messages.CHALLENGE, "proto": PROTOCOL_VERSION, "nonce": self._nonce}
        proof = _field(msg, messages.AUTH, "proof", bytes)
        session = msg.get("session")
        if session is not None and (not isinstance(session, str)
                                    or len(session) > _MAX_SESSION_LEN):
            raise ProtocolError("bad session id in the handshake")
        matched = None
        for name, token in self._tokens.items():
            expected = client_proof(token, self._nonce, self._client_nonce)
            if hmac.compare_digest(proof, expected) and matched is None:
                matched = name
        if matched is None:
            raise AuthError("authentication failed: wrong token")
        self.done = True
        self.session = session
        self.principal = matched
        return {
            "kind": messages.WELCOME,
            "proto": PROTOCOL_VERSION,
            "proof": server_proof(self._tokens[matched], self._client_nonce, self._nonce),
            "versions": local_versions(),
        }

    @staticmethod
    def refusal(reason: str, code: str = "auth") -> dict:
        """``code`` says what kind of refusal it is (see ``REFUSAL_CODES``)."""
        return {"kind": messages.REFUSED, "reason": reason, "code": code}


class ClientHandshake:
    """Client side: ``start()`` gives the hello; feed each server message to ``receive``.

    ``versions`` is what the hello announces; after ``done``, ``peer_versions`` is what the
    server runs (None if it did not say).
    """

    def __init__(
        self, token: str | bytes, *, session: str | None = None, nonce: bytes | None = None,
        shared_memory: bool = False,
    ) -> None:
        self._token = _key(token)
        self._shared_memory = shared_memory
        self._nonce = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._server_nonce: bytes | None = None
        self._session = session
        self.done = False
        self.welcome: dict | None = None
        self.versions = local_versions()  # what this side announces
        self.peer_versions: dict[str, str] | None = None

    def start(self) -> dict:
        hello = {"kind": messages.HELLO, "proto": PROTOCOL_VERSION, "nonce": self._nonce,
                 "versions": self.versions}
        if self._shared_memory:
            hello["shm"] = 1
        return hello

    def receive(self, msg: Any) -> dict | None:
        if type(msg) is dict and msg.get("kind") == messages.REFUSED:
            reason = msg.get("reason")
            reason = reason if isinstance(reason, str) else "?"
            code = msg.get("code")
            error = REFUSAL_CODES.get(code, AuthError) if isinstance(code, str) else AuthError
            raise error(f"server refused the connection: {reason}")
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
        self.peer_versions = _versions(msg)
        self.done = True
        self.welcome = msg
        return None
