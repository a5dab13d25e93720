"""Sessions: each client's own namespace of save contexts, alive across reconnects.

A session's context ``acts`` is the model-level context ``s/{session id}/acts``; names that
start with ``shared/`` are the same for every session. A session outlives its connections: a
client that reconnects with its session id gets its contexts back. A session with no
connection and no work for longer than the operator's idle expiry is dropped with its
contexts. With a state directory the registry is kept on disk, so sessions (and, through the
store's journal, their contexts) survive a restart of the server.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cloche.errors import UsageError
from cloche.probes.disk import atomic_write

__all__ = ["SHARED_PREFIX", "Session", "SessionRegistry"]

SHARED_PREFIX = "shared/"
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class Session:
    """One client's namespace. ``busy`` counts its open connections and unfinished requests."""

    def __init__(self, sid: str) -> None:
        self.id = sid
        self.prefix = f"s/{sid}/"
        self.busy = 0
        self.last_seen = time.monotonic()

    def context_name(self, name: str | None, default: str) -> str:
        """The model-level name of this session's context ``name``."""
        if name is None:
            name = default
        if not isinstance(name, str) or not name:
            raise UsageError(f"save context names are non-empty strings, not {name!r}")
        if name.startswith(SHARED_PREFIX):
            if len(name) == len(SHARED_PREFIX):
                raise UsageError("a shared save context needs a name after 'shared/'")
            return name
        return self.prefix + name

    def visible(self, model_names: list[str]) -> list[str]:
        """The session's view of the model's context names: its own plus the shared ones."""
        own = [n[len(self.prefix) :] for n in model_names if n.startswith(self.prefix)]
        shared = [n for n in model_names if n.startswith(SHARED_PREFIX)]
        return sorted(own) + sorted(shared)


class SessionRegistry:
    """All live sessions; thread-safe. ``path``: a file that keeps the session ids on disk."""

    def __init__(self, idle_expiry: float | None, path: str | Path | None = None) -> None:
        self.idle_expiry = idle_expiry
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        if self._path is not None and self._path.exists():
            for sid in json.loads(self._path.read_text()).get("sessions", []):
                if _SESSION_ID.match(sid):
                    self._sessions[sid] = Session(sid)

    def _save(self) -> None:
        """Write the session ids (under the lock); a session is on disk before its welcome."""
        if self._path is None:
            return
        text = json.dumps({"sessions": sorted(self._sessions)})
        atomic_write(self._path, lambda tmp: Path(tmp).write_text(text))

    def open(self, requested: str | None) -> tuple[Session, bool]:
        """Resume ``requested`` if it is alive, else start a new session: (session, resumed)."""
        with self._lock:
            session = None
            if requested is not None and _SESSION_ID.match(requested):
                session = self._sessions.get(requested)
            resumed = session is not None
            if session is None:
                session = Session(secrets.token_hex(16))
                self._sessions[session.id] = session
                self._save()
            session.busy += 1
            session.last_seen = time.monotonic()
            return session, resumed

    def acquire(self, session: Session) -> None:
        with self._lock:
            session.busy += 1
            session.last_seen = time.monotonic()

    def release(self, session: Session) -> None:
        with self._lock:
            session.busy -= 1
            session.last_seen = time.monotonic()

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def expire(self, drop_contexts: Callable[[Session], None], now: float | None = None
               ) -> list[str]:
        """Drop idle sessions (and, through ``drop_contexts``, their save contexts)."""
        if self.idle_expiry is None:
            return []
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [
                s for s in self._sessions.values()
                if s.busy == 0 and now - s.last_seen > self.idle_expiry
            ]
            for session in idle:
                del self._sessions[session.id]
            if idle:
                self._save()
        for session in idle:
            drop_contexts(session)
        return [s.id for s in idle]
