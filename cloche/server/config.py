"""Server configuration: one small value object, parsed once at the entry point."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

from cloche.errors import UsageError
from cloche.server.principals import (
    OWNER,
    Principal,
    check_distinct,
    check_token,
)

__all__ = ["ServerConfig", "is_loopback"]


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps the server on this machine: 127.0.0.0/8, ::1 (also
    IPv4-mapped) or ``localhost``. Any other name is not trusted to resolve to loopback."""
    if host.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How a server listens, authenticates and bounds its clients.

    Either one ``token`` (its holder is principal ``owner``, with full control) or several named
    ``principals`` (``cloche.server.principals``), each with its own sessions, caps and queue
    share.

    ``session_idle_expiry`` (seconds, ``None`` for never) drops a session's save contexts once
    it has had no connection and no work for that long. ``max_frame_bytes`` bounds what an
    authenticated client may send in one frame (before authentication the bound is 4 KiB).
    ``request_timeout`` (seconds, ``None`` for no limit) stops a heavy request that runs longer,
    user code stuck in a loop included. ``max_saved_bytes`` caps what all sessions' save
    contexts may hold (on each rank of a sharded model). ``state_dir`` keeps the sessions on
    disk (the model's store keeps their save contexts there too:
    ``cloche.load(..., state_dir=...)``).

    Strangers (see :mod:`cloche.server.guard`): ``handshake_timeout`` is one deadline for the
    whole handshake (TLS included), not for each read, so a peer trickling bytes cannot hold a
    slot longer. At most ``max_unauthenticated_per_address`` connections per peer address and
    ``max_unauthenticated`` in all may be unauthenticated at once (when all are taken, a
    newcomer evicts a half-open connection of the address holding the most). After
    ``auth_failure_limit`` wrong tokens from an address, it is refused for ``auth_backoff``
    seconds, doubling with each further failure up to ``auth_backoff_max``.

    ``max_outbox_bytes`` bounds the replies queued for one connection beyond the frame being
    sent: a client that stops reading is disconnected (its requests cancelled) instead of
    growing the server's memory; one reply of any size still goes to a client that reads.

    ``shared_memory`` offers clients on this host (same user, same pid namespace: proven at
    the handshake) to receive large replies through shared memory instead of the socket
    (``cloche.wire.shm``).

    Off loopback the server needs TLS (``tls_cert``) unless ``insecure_no_tls`` says otherwise:
    the handshake proves who the client is, but only TLS protects the frames that follow it.
    """

    token: str | None = None
    principals: tuple[Principal, ...] = ()
    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    session_idle_expiry: float | None = 24 * 3600.0
    handshake_timeout: float = 10.0
    max_frame_bytes: int = 1 << 40
    max_connections: int = 256
    max_outbox_bytes: int = 256 * 1024 * 1024
    max_unauthenticated: int = 64
    max_unauthenticated_per_address: int = 8
    auth_failure_limit: int = 5
    auth_backoff: float = 1.0
    auth_backoff_max: float = 300.0
    progress_interval: float = 0.05
    request_timeout: float | None = None
    max_saved_bytes: int | None = None
    state_dir: str | None = None
    insecure_no_tls: bool = False
    shared_memory: bool = True

    def __post_init__(self) -> None:
        if self.principals:
            if self.token is not None:
                raise UsageError("give the server a token or named principals, not both")
            if not all(isinstance(p, Principal) for p in self.principals):
                raise UsageError("principals must be cloche.server.principals.Principal objects")
            object.__setattr__(self, "principals", tuple(self.principals))
            check_distinct(list(self.principals))
        else:
            if self.token is None:
                raise UsageError("the server needs a token (or named principals)")
            check_token(self.token)
            object.__setattr__(self, "principals", (Principal(OWNER, self.token),))
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port ({self.port}) must be between 0 and 65535")
        if self.tls_key is not None and self.tls_cert is None:
            raise UsageError("--tls-key needs --tls-cert")
        if not is_loopback(self.host) and self.tls_cert is None and not self.insecure_no_tls:
            raise UsageError(
                f"refusing to serve on {self.host or 'every interface'!r} without TLS. The"
                " handshake proves that a client knows the token, but only TLS protects the"
                " frames that follow it: anyone on the network path could read them, or inject"
                " a request that runs code as this user. Pass --tls-cert/--tls-key"
                " (ServerConfig.tls_cert/tls_key), or --insecure-no-tls"
                " (ServerConfig.insecure_no_tls=True) if every machine on the path is trusted."
                " Loopback addresses (127.0.0.1, ::1, localhost) need no TLS: other users cannot"
                " intercept loopback traffic.")
        if self.session_idle_expiry is not None and self.session_idle_expiry <= 0:
            raise UsageError(
                f"session_idle_expiry ({self.session_idle_expiry}) must be positive or None"
            )
        if self.max_saved_bytes is not None and (
                isinstance(self.max_saved_bytes, bool) or not isinstance(self.max_saved_bytes, int)
                or self.max_saved_bytes < 0):
            raise UsageError(f"max_saved_bytes ({self.max_saved_bytes!r}) must be a size in"
                             " bytes or None")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise UsageError(f"request_timeout ({self.request_timeout}) must be positive or None")
        for name in ("handshake_timeout", "auth_backoff", "auth_backoff_max"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} ({getattr(self, name)}) must be positive")
        for name in ("max_connections", "max_outbox_bytes", "max_unauthenticated",
                     "max_unauthenticated_per_address", "auth_failure_limit"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} ({value!r}) must be a positive int")

    @property
    def group_secret(self) -> str:
        """What every node of a torchrun group derives its control key from: the token, or
        (several principals) a digest of all of them, which every node's token file holds."""
        if len(self.principals) == 1 and self.token is not None:
            return self.token
        joined = "\n".join(sorted(p.token for p in self.principals))
        return hashlib.sha256(joined.encode()).hexdigest()

    def __repr__(self) -> str:  # never print a token
        return (f"ServerConfig(host={self.host!r}, port={self.port},"
                f" principals={[p.name for p in self.principals]})")
