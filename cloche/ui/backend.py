"""The UI's side of the model: one lock, one cache, and the jobs that can be cancelled.

Pages are computed in worker threads (the web server's event loop never waits on the model),
one at a time (a model answers one request at a time anyway, and a page must not interleave
its runs with another's scratch save contexts). Results are cached by page and parameters —
for the unit page that is (model, dataset, point, unit, limit) — so a page seen before renders
from memory. A job is a computation that streams progress; the page can cancel it by id (or by
closing the connection), which sets the ``cancel`` event that ``run_dataset`` watches.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["Backend"]

CACHE_ENTRIES = 256


class Backend:
    """A :class:`cloche.Model` (local, sharded or connected) as the web app uses it."""

    def __init__(self, model: Any, *, dataset: str = "default:heldout", limit: int = 512
                 ) -> None:
        self.model = model
        self.dataset = dataset
        self.limit = limit
        self.name = str(model.name)
        self._lock = threading.Lock()
        self._cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._cache_lock = threading.Lock()
        self._jobs: dict[str, threading.Event] = {}

    def cached(self, key: Hashable) -> tuple[bool, Any]:
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return True, self._cache[key]
        return False, None

    def remember(self, key: Hashable, value: Any) -> None:
        with self._cache_lock:
            self._cache[key] = value
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)

    def forget(self, prefix: str) -> None:
        """Drop cached pages whose key starts with ``prefix`` (e.g. after clearing contexts)."""
        with self._cache_lock:
            for key in [k for k in self._cache if isinstance(k, tuple) and k[:1] == (prefix,)]:
                del self._cache[key]

    def compute(self, key: Hashable | None, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` under the model lock, cached under ``key`` (unless
        None). Runs in the calling (worker) thread."""
        if key is not None:
            hit, value = self.cached(key)
            if hit:
                return value
        with self._lock:
            if key is not None:  # another request may have computed it while we waited
                hit, value = self.cached(key)
                if hit:
                    return value
            value = fn(self.model, *args, **kwargs)
        if key is not None:
            self.remember(key, value)
        return value

    def start_job(self, job: str) -> threading.Event:
        event = threading.Event()
        self._jobs[job] = event
        return event

    def end_job(self, job: str) -> None:
        self._jobs.pop(job, None)

    def cancel_job(self, job: str) -> bool:
        event = self._jobs.get(job)
        if event is None:
            return False
        event.set()
        return True
