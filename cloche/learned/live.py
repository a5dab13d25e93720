"""Objects being trained in the process that runs their point, kept by job id between runs.

A learner (a probe's data, a steering vector and its optimizer) lives where its point lives —
this process, the server, or the rank of a sharded model that owns the point — so activations
and gradients never cross the wire. Probes shipped with each run find it here by job id; one
``model.call(..., rank=owner)`` at the end takes it out and returns what the client needs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from cloche.errors import ClocheError

__all__ = ["get_or_create", "optimise", "pop", "running"]

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


def optimise(model: Any, point: str, job: str, probe: Any, batches: Sequence[tuple[Any, Any]],
             steps: int, *, owner: Any, result: Callable[[Any], T], cancel: Any = None) -> T:
    """Train ``job``'s learner with ``steps`` forward + backward passes over ``batches``
    (``(inputs, backward)`` pairs, cycled); ``probe`` at ``point`` feeds the learner, each pass's
    probe applying the optimizer step of the pass before. Then, on the rank ``owner`` that
    holds it, the last step is taken, the model's weight gradients are let go and
    ``result(learner)`` is what comes back. On any failure the learner is dropped there."""
    save = f"__learn__/{job}"
    try:
        for step in range(steps):
            inputs, backward = batches[step % len(batches)]
            model.run(inputs, probes={point: probe}, backward=backward, save=save,
                      return_logits=False, cancel=cancel, progress=False)
        return model.call(_finish, job, result, rank=owner)
    except BaseException:
        with contextlib.suppress(ClocheError):
            model.call(_drop, job, rank=owner)
        raise
    finally:
        model.save_context(save).clear()


def _finish(model: Any, job: str, result: Callable[[Any], T]) -> T:
    """Where the learner lives: its last step, the weights' gradients let go, its result."""
    learner = pop(job)
    learner.step()
    hf_model = getattr(model, "hf_model", None)
    if isinstance(hf_model, torch.nn.Module):
        hf_model.zero_grad(set_to_none=True)
    with torch.no_grad():
        return result(learner)


def _drop(model: Any, job: str) -> None:
    pop(job, required=False)
