"""Message kinds and their shapes: builders for the sender, validators for the receiver.

Every message is a msgpack map with a ``kind``. After the handshake a client sends ``request``
(an id and one request record of ``cloche.api.requests``) and ``cancel``; a server answers each
request id with any number of ``event`` messages (queue position, progress) followed by exactly
one ``result`` or ``error``. Validators raise :class:`~cloche.errors.ProtocolError` for anything
out of shape. Pure; no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from cloche.errors import ProtocolError

__all__ = [
    "AUTH",
    "CANCEL",
    "CHALLENGE",
    "ERROR",
    "EVENT",
    "EVENTS",
    "HELLO",
    "REFUSED",
    "REQUEST",
    "RESULT",
    "SHM",
    "SHM_RELEASE",
    "WELCOME",
    "Request",
    "cancel",
    "error",
    "event",
    "parse_request_or_cancel",
    "parse_response",
    "request",
    "result",
    "shm_proof",
    "shm_release",
]

HELLO = "hello"
CHALLENGE = "challenge"
AUTH = "auth"
WELCOME = "welcome"
REFUSED = "refused"
REQUEST = "request"
CANCEL = "cancel"
RESULT = "result"
ERROR = "error"
EVENT = "event"
#: shared memory (``cloche.wire.shm``): a proof that one side opened the other's offer, and its
#: word that it no longer maps the files of these shared memory frames (or could not). The
#: client sends both for replies; the server sends both for requests, when the client offered
SHM = "shm"
SHM_RELEASE = "shm_release"

_MAX_ID = (1 << 63) - 1

#: what a request's ``events`` field may ask for (absent: ``"all"``). ``"all"``: every event;
#: ``"shown"``: only what a progress bar shows (queue positions while others run ahead,
#: ``started`` after such a position, progress counts); ``"none"``: no events (nobody listens).
EVENTS = ("all", "shown", "none")


@dataclass(frozen=True)
class Request:
    """A validated request: ``op`` is the request record (None for a cancel of request ``id``);
    ``events``: which of its events the client wants (one of :data:`EVENTS`)."""

    id: int
    op: Any
    events: str = "all"


def request(rid: int, op: Any, events: str = "all") -> dict:
    """A request message; ``events`` other than ``"all"`` travels (fewer frames back)."""
    if events == "all":
        return {"kind": REQUEST, "id": rid, "op": op}
    return {"kind": REQUEST, "id": rid, "op": op, "events": events}


def cancel(rid: int) -> dict:
    return {"kind": CANCEL, "id": rid}


def result(rid: int, value: Any) -> dict:
    return {"kind": RESULT, "id": rid, "value": value}


def error(rid: int | None, payload: dict[str, Any]) -> dict:
    return {"kind": ERROR, "id": rid, "error": payload}


def event(rid: int, payload: dict[str, Any]) -> dict:
    return {"kind": EVENT, "id": rid, "event": payload}


def shm_proof(proof: bytes, offer: dict[str, int] | None = None) -> dict:
    """A proof that the sender read the peer's offer; ``offer``: the sender's own offer (a
    client offering to send its large requests through shared memory too)."""
    if offer is None:
        return {"kind": SHM, "proof": proof}
    return {"kind": SHM, "proof": proof, "offer": offer}


def shm_release(fds: list[int]) -> dict:
    return {"kind": SHM_RELEASE, "fds": fds}


def _kind(msg: Any) -> str:
    if type(msg) is not dict or not isinstance(msg.get("kind"), str):
        raise ProtocolError("a message must be a map with a string 'kind'")
    return msg["kind"]


def _id(msg: dict) -> int:
    rid = msg.get("id")
    if type(rid) is not int or not 0 <= rid <= _MAX_ID:
        raise ProtocolError(f"bad request id {rid!r}"[:100])
    return rid


def parse_request_or_cancel(msg: Any) -> Request:
    """Validate what an authenticated client sent."""
    kind = _kind(msg)
    if kind == CANCEL:
        return Request(_id(msg), None)
    if kind != REQUEST:
        raise ProtocolError(f"unexpected message kind {kind!r} from a client"[:100])
    rid = _id(msg)
    op = msg.get("op")
    if op is None or not dataclasses.is_dataclass(op) or isinstance(op, type):
        raise ProtocolError("a request needs an 'op' record")
    events = msg.get("events", "all")
    if events not in EVENTS:
        raise ProtocolError(f"a request's 'events' is one of {list(EVENTS)}, not {events!r}"[:100])
    return Request(rid, op, events)


def parse_response(msg: Any) -> tuple[str, int | None, Any]:
    """Validate what a server sent after the handshake: (kind, request id, payload)."""
    kind = _kind(msg)
    if kind == RESULT:
        return kind, _id(msg), msg.get("value")
    if kind == ERROR:
        payload = msg.get("error")
        if type(payload) is not dict:
            raise ProtocolError("an error message needs an 'error' map")
        return kind, None if msg.get("id") is None else _id(msg), payload
    if kind == EVENT:
        payload = msg.get("event")
        if type(payload) is not dict:
            raise ProtocolError("an event message needs an 'event' map")
        return kind, _id(msg), payload
    raise ProtocolError(f"unexpected message kind {kind!r} from a server"[:100])
