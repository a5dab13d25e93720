"""Sessions: each client's own namespace of save contexts, alive across reconnects.

Every session belongs to the principal whose token opened it (``owner`` on a single-token
server). Its context ``acts`` is the model-level context ``p/{principal}/s/{session id}/acts``;
names that start with ``shared/`` are common to the sessions of one principal
(``p/{principal}/shared/...``), and no principal sees another's. A session outlives its
connections: a client of the same principal that reconnects with its session id gets its
contexts back. A session with no
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
from cloche.server.principals import OWNER

__all__ = ["SHARED_PREFIX", "Session", "SessionRegistry"]

SHARED_PREFIX = "shared/"
_SESSION_ID = re.compile(r"^[0-9a-f]{32}$")


class Session:
    """One client's namespace. ``busy`` counts its open connections and unfinished requests."""

    def __init__(self, sid: str, principal: str = OWNER) -> None:
        self.id = sid
        self.principal = principal
        self.root = self.root_of(principal)  # everything this principal's sessions may touch
        self.prefix = f"{self.root}s/{sid}/"
        self.busy = 0
        self.last_seen = time.monotonic()

    @staticmethod
    def root_of(principal: str) -> str:
        """The model-level prefix of every context of ``principal``'s sessions."""
        return f"p/{principal}/"

    def context_name(self, name: str | None, default: str) -> str:
        """The model-level name of this session's context ``name``."""
        if name is None:
            name = default
        if not isinstance(name, str) or not name:
            raise UsageError(f"save context names are non-empty strings, not {name!r}")
        if name.startswith(SHARED_PREFIX):
            if len(name) == len(SHARED_PREFIX):
                raise UsageError("a shared save context needs a name after 'shared/'")
            return self.root + name
        return self.prefix + name

    def user_name(self, model_name: str) -> str:
        """How the session calls a model-level name of its own (inverse of ``context_name``)."""
        if model_name.startswith(self.prefix):
            return model_name[len(self.prefix):]
        if model_name.startswith(self.root + SHARED_PREFIX):
            return model_name[len(self.root):]
        return model_name

    def visible(self, model_names: list[str]) -> list[str]:
        """The session's view of the model's context names: its own plus its principal's
        shared ones."""
        shared_root = self.root + SHARED_PREFIX
        own = [self.user_name(n) for n in model_names if n.startswith(self.prefix)]
        shared = [self.user_name(n) for n in model_names if n.startswith(shared_root)]
        return sorted(own) + sorted(shared)


class SessionRegistry:
    """All live sessions; thread-safe. ``path``: a file that keeps the session ids on disk."""

    def __init__(self, idle_expiry: float | None, path: str | Path | None = None) -> None:
        self.idle_expiry = idle_expiry
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()
        self._path = Path(path) if path is not None else None
        if self._path is not None and self._path.exists():
            for entry in json.loads(self._path.read_text()).get("sessions", []):
                if isinstance(entry, str):  # written before principals: the owner's
                    entry = {"id": entry, "principal": OWNER}
                if not isinstance(entry, dict):
                    continue
                sid, principal = entry.get("id"), entry.get("principal")
                if isinstance(sid, str) and _SESSION_ID.match(sid) and isinstance(principal, str):
                    self._sessions[sid] = Session(sid, principal)

    def _save(self) -> None:
        """Write the sessions (under the lock); a session is on disk before its welcome."""
        if self._path is None:
            return
        text = json.dumps({"sessions": [{"id": s.id, "principal": s.principal}
                                        for s in sorted(self._sessions.values(),
                                                        key=lambda s: s.id)]})
        atomic_write(self._path, lambda tmp: Path(tmp).write_text(text))

    def open(self, requested: str | None, principal: str = OWNER) -> tuple[Session, bool]:
        """Resume ``requested`` if it is alive and ``principal``'s, else start a new session:
        (session, resumed). Another principal's session id is treated like an unknown one."""
        with self._lock:
            session = None
            if requested is not None and _SESSION_ID.match(requested):
                session = self._sessions.get(requested)
                if session is not None and session.principal != principal:
                    session = None
            resumed = session is not None
            if session is None:
                session = Session(secrets.token_hex(16), principal)
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

    def count(self, principal: str | None = None) -> int:
        """Live sessions, or those of ``principal``."""
        with self._lock:
            return sum(1 for s in self._sessions.values()
                       if principal is None or s.principal == principal)

    def expire(self, drop_contexts: Callable[[Session], None], now: float | None = None
               ) -> list[str]:
        """Drop idle sessions (and, through ``drop_contexts``, their save contexts); their ids."""
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
