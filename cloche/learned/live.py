"""Objects being trained in the process that runs their point, kept by job id between runs.

A learner (a probe's data, a steering vector and its optimizer) lives where its point lives —
this process, the server, or the rank of a sharded model that owns the point — so activations
and gradients never cross the wire. Probes shipped with each run find it here by job id; one
``model.call(..., rank=owner)`` at the end takes it out and returns what the client needs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from cloche.errors import ClocheError

__all__ = ["get_or_create", "pop", "running"]

T = TypeVar("T")

#: the learners of this process, by job id
_LIVE: dict[str, Any] = {}
_LOCK = threading.Lock()


def get_or_create(job: str, make: Callable[[], T]) -> T:
    """The learner of ``job`` in this process, made by ``make()`` the first time."""
    with _LOCK:
        learner = _LIVE.get(job)
        if learner is None:
            learner = _LIVE[job] = make()
        return learner


def pop(job: str, *, required: bool = True) -> Any:
    """Take ``job``'s learner out of this process (None if absent and not ``required``)."""
    with _LOCK:
        learner = _LIVE.pop(job, None)
    if learner is None and required:
        raise ClocheError(f"nothing is being trained under job {job!r} in this process")
    return learner


def running() -> list[str]:
    """The jobs with a learner in this process (for tests and diagnostics)."""
    with _LOCK:
        return sorted(_LIVE)
