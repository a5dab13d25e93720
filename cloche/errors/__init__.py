"""Every error cloche raises, in one hierarchy.

Callers catch what they can act on; the hierarchy is::

    ClocheError
    ├── UsageError                 bad arguments from the caller (also a ValueError)
    │   └── UnknownProbePoint      a probe point name that the model does not have (also a KeyError)
    ├── UserCodeError              the user's own code raised (the original is chained/quoted)
    │   ├── ProbeError             a probe, gradient probe or backward function
    │   └── CallError              a function shipped with ``model.call``
    ├── RemoteError                anything else that failed on the server (carries the traceback)
    ├── Cancelled                  the request was cancelled (by the client or a disconnect)
    │   └── Aborted                another rank failed, so this rank stopped its part (internal
    │                              to sharded execution: the user sees the root failure)
    ├── WorkerLost                 a rank died or stopped answering
    ├── ResourceLimit              a configured limit (memory for saved data, frame size) was hit
    ├── ProtocolError              the peer sent bytes that are not cloche protocol
    │   ├── FrameTooLarge
    │   └── VersionMismatch        the peer speaks another cloche protocol version
    └── ConnectionError            the connection could not be made or was lost
        ├── AuthError              the handshake failed (wrong or missing token)
        └── SessionLost            the server no longer has the session (restarted without
                                   --state-dir, or the session expired): its contexts are gone

Errors that happen on a server carry ``request_id``, ``rank`` and ``remote_traceback`` so that
the user sees which of their code failed, where, and why. ``cloche.errors.payload`` turns an
error into plain data and back — the one codec used by the wire and between ranks.
"""

from __future__ import annotations

import builtins

__all__ = [
    "Aborted",
    "AuthError",
    "CallError",
    "Cancelled",
    "ClocheError",
    "ConnectionError",
    "FrameTooLarge",
    "ProbeError",
    "ProtocolError",
    "RemoteError",
    "ResourceLimit",
    "SessionLost",
    "UnknownProbePoint",
    "UsageError",
    "UserCodeError",
    "VersionMismatch",
    "WorkerLost",
]


class ClocheError(Exception):
    """Base class of every cloche error.

    ``request_id``, ``rank`` and ``remote_traceback`` are filled in when the error happened on a
    server; they are ``None`` for errors raised locally.
    """

    def __init__(
        self,
        message: str = "",
        *,
        request_id: int | None = None,
        rank: int | None = None,
        remote_traceback: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.rank = rank
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = self.message
        where = []
        if self.request_id is not None:
            where.append(f"request {self.request_id}")
        if self.rank is not None:
            where.append(f"rank {self.rank}")
        if where:
            text = f"{text} [{', '.join(where)}]"
        if self.remote_traceback:
            text = f"{text}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return text


class UsageError(ClocheError, ValueError):
    """The caller asked for something that cannot be done as asked."""


class UnknownProbePoint(UsageError, KeyError):
    """A probe point (or weight) name the model does not have."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return ClocheError.__str__(self)


class UserCodeError(ClocheError):
    """The user's own code raised: catch this for "my code failed", whichever kind it was.

    ``point`` names the probe point (``None`` outside a probe), ``probe`` the function's
    qualified name; the original exception is chained as ``__cause__`` when it is local.
    """

    def __init__(
        self,
        message: str = "",
        *,
        point: str | None = None,
        probe: str | None = None,
        **kwargs,
    ) -> None:
        super().__init__(message, **kwargs)
        self.point = point
        self.probe = probe


class ProbeError(UserCodeError):
    """A probe, gradient probe or backward function raised."""


class CallError(UserCodeError):
    """A function shipped with ``model.call`` raised."""


class RemoteError(ClocheError):
    """An error on the server that is not the user's code (the traceback says where)."""


class Cancelled(ClocheError):
    """The request was cancelled before it finished; its partial writes were rolled back."""


class Aborted(Cancelled):
    """This rank stopped its part of a command because another rank (or the client) aborted it."""


class WorkerLost(ClocheError):
    """A rank of a sharded server died or stopped answering."""


class ResourceLimit(ClocheError):
    """A configured limit was reached (memory for saved data, frame size, ...)."""


class ProtocolError(ClocheError):
    """The peer sent something that is not valid cloche protocol."""


class FrameTooLarge(ProtocolError, ResourceLimit):
    """A frame announced a size above the configured maximum."""


class VersionMismatch(ProtocolError):
    """The peer speaks another version of the cloche protocol (the message names both).

    ``received`` is the peer's protocol version and ``speaks`` this side's, when known.
    """

    def __init__(self, message: str = "", *, received: object = None, speaks: object = None,
                 **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.received = received
        self.speaks = speaks


class ConnectionError(ClocheError, builtins.ConnectionError):
    """The connection to a server could not be made, or was lost."""


class AuthError(ConnectionError):
    """The handshake failed: wrong token, no token, or the peer is not a cloche server."""


class SessionLost(ConnectionError):
    """The server does not have the session the client asked to resume.

    It restarted without ``--state-dir`` (nothing was kept), or the session expired. Its save
    contexts are gone; ``cloche.connect(...)`` without ``session=`` starts a new one.
    """
