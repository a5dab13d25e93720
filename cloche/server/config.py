"""Server configuration: one small value object, parsed once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass

from cloche.errors import UsageError

__all__ = ["ServerConfig"]


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """How a server listens, authenticates and bounds its clients.

    ``session_idle_expiry`` (seconds, ``None`` for never) drops a session's save contexts once
    it has had no connection and no work for that long. ``max_frame_bytes`` bounds what an
    authenticated client may send in one frame (before authentication the bound is 4 KiB).
    ``request_timeout`` (seconds, ``None`` for no limit) stops a heavy request that runs longer,
    user code stuck in a loop included. ``state_dir`` keeps the sessions on disk (the model's
    store keeps their save contexts there too: ``cloche.load(..., state_dir=...)``).
    """

    token: str
    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: str | None = None
    tls_key: str | None = None
    session_idle_expiry: float | None = 24 * 3600.0
    handshake_timeout: float = 10.0
    max_frame_bytes: int = 1 << 40
    max_connections: int = 256
    progress_interval: float = 0.05
    request_timeout: float | None = None
    state_dir: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.token, str) or not self.token:
            raise UsageError("the server needs a non-empty token")
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port ({self.port}) must be between 0 and 65535")
        if self.tls_key is not None and self.tls_cert is None:
            raise UsageError("--tls-key needs --tls-cert")
        if self.session_idle_expiry is not None and self.session_idle_expiry <= 0:
            raise UsageError(
                f"session_idle_expiry ({self.session_idle_expiry}) must be positive or None"
            )
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise UsageError(f"request_timeout ({self.request_timeout}) must be positive or None")
        if self.handshake_timeout <= 0:
            raise UsageError(f"handshake_timeout ({self.handshake_timeout}) must be positive")
