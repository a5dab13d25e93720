"""Exceptions as data: how an error on the server travels and is re-raised on the client.

The payload is a plain map (``type``, ``message``, ``request_id``, ``rank``, ``traceback`` and,
for probe failures, ``point`` and ``probe``). ``type`` names a class of :mod:`cloche.errors`;
anything else that went wrong on the server travels as ``RemoteError`` whose message starts
with the original class name. Re-raising never evaluates anything from the payload: the class
is looked up in cloche's own error hierarchy by name.
"""

from __future__ import annotations

import traceback
from typing import Any

from cloche import errors

__all__ = ["from_payload", "to_payload"]

_CLASSES: dict[str, type[errors.ClocheError]] = {
    name: getattr(errors, name)
    for name in errors.__all__
    if isinstance(getattr(errors, name), type)
    and issubclass(getattr(errors, name), errors.ClocheError)
}
_MAX_TEXT = 64 * 1024


def to_payload(exc: BaseException, request_id: int | None, *, rank: int | None = None) -> dict:
    """Describe ``exc`` (with its chained causes' traceback) for the wire."""
    text = "".join(traceback.format_exception(exc))[-_MAX_TEXT:]
    if isinstance(exc, errors.ClocheError) and type(exc).__name__ in _CLASSES:
        kind = type(exc).__name__
        message = exc.message
        exc_rank = exc.rank if exc.rank is not None else rank
    elif isinstance(exc, errors.ClocheError):  # a subclass defined elsewhere: nearest known base
        kind = next(c.__name__ for c in type(exc).__mro__ if c.__name__ in _CLASSES)
        message = f"{type(exc).__name__}: {exc.message}"
        exc_rank = exc.rank if exc.rank is not None else rank
    else:
        kind = "RemoteError"
        message = f"{type(exc).__name__}: {exc}"
        exc_rank = rank
    payload: dict[str, Any] = {
        "type": kind,
        "message": message[:_MAX_TEXT],
        "request_id": request_id,
        "rank": exc_rank,
        "traceback": text,
    }
    if isinstance(exc, errors.UserCodeError):
        payload["point"] = exc.point
        payload["probe"] = exc.probe
    return payload


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def from_payload(payload: dict) -> errors.ClocheError:
    """The exception to raise on the client for an error payload."""
    kind = payload.get("type")
    cls = _CLASSES.get(kind) if isinstance(kind, str) else None
    message = _text(payload.get("message")) or ""
    if cls is None:
        cls = errors.RemoteError
        message = f"{kind}: {message}"
    request_id = _int(payload.get("request_id"))
    rank = _int(payload.get("rank"))
    remote_traceback = _text(payload.get("traceback"))
    if issubclass(cls, errors.UserCodeError):
        return cls(message, point=_text(payload.get("point")), probe=_text(payload.get("probe")),
                   request_id=request_id, rank=rank, remote_traceback=remote_traceback)
    return cls(message, request_id=request_id, rank=rank, remote_traceback=remote_traceback)
