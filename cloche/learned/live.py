"""Objects being trained in the process that runs their point, kept by job id between runs.

A learner (a probe's data, a steering vector and its optimizer) lives where its point lives —
this process, the server, or the rank of a sharded model that owns the point — so activations
and gradients never cross the wire. Probes shipped with each run find it here by job id; one
``model.call(..., rank=owner)`` at the end takes it out and returns what the client needs.
:func:`train` is that loop, written once for every learner here and for dictionary training.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch

from cloche.errors import ClocheError

__all__ = ["drop", "get_or_create", "optimise", "pop", "running", "train"]

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


def train(model: Any, job: str, passes: Iterable[Callable[[str], object]], *, owner: Any,
          finish: Callable[..., T], args: tuple[Any, ...] = (),
          stop: Callable[[Any, str], None] | None = None) -> T:
    """The one loop every learner trains by (probes, steering vectors, DAS, dictionaries).

    Each of ``passes`` is called with the name of the save context to run under (its forward
    passes carry the probes that feed ``job``'s learner; progress and cancel are theirs); then
    ``finish(model, job, *args)`` runs on the rank ``owner`` that holds the learner and its
    value comes back. On any failure or cancel, ``stop(model, job)`` runs there instead
    (default: drop the learner; a trainer with checkpoints writes one) — a lost connection
    there must not hide the original error, which is raised. The save context is cleared
    whatever happens.
    """
    save = f"__learn__/{job}"
    try:
        for run_pass in passes:
            run_pass(save)
        return model.call(finish, job, *args, rank=owner)
    except BaseException:
        with contextlib.suppress(ClocheError):
            model.call(stop if stop is not None else drop, job, rank=owner)
        raise
    finally:
        model.save_context(save).clear()


def optimise(model: Any, point: str, job: str, probe: Any, batches: Sequence[tuple[Any, Any]],
             steps: int, *, owner: Any, result: Callable[[Any], T], cancel: Any = None) -> T:
    """Train ``job``'s learner with ``steps`` forward + backward passes over ``batches``
    (``(inputs, backward)`` pairs, cycled); ``probe`` at ``point`` feeds the learner, each pass's
    probe applying the optimizer step of the pass before. Then, on the rank ``owner`` that
    holds it, the last step is taken and ``result(learner)`` is what comes back; every rank
    lets go of the weight gradients the backward passes left. On any failure the learner is
    dropped there."""

    def step(index: int) -> Callable[[str], object]:
        inputs, backward = batches[index % len(batches)]
        return lambda save: model.run(inputs, probes={point: probe}, backward=backward,
                                      save=save, return_logits=False, cancel=cancel,
                                      progress=False)

    try:
        out = train(model, job, (step(i) for i in range(steps)), owner=owner, finish=_finish,
                    args=(result,))
    except BaseException:
        with contextlib.suppress(ClocheError):
            model.call(_let_go_of_gradients, rank="all")
        raise
    # the backward passes left gradients in the weights of every rank the loss went through
    model.call(_let_go_of_gradients, rank="all")
    return out


def _finish(model: Any, job: str, result: Callable[[Any], T]) -> T:
    """Where the learner lives: its last step and its result."""
    learner = pop(job)
    learner.step()
    with torch.no_grad():
        return result(learner)


def _let_go_of_gradients(model: Any) -> None:
    """On each rank: the weights' gradients that the backward passes left, let go."""
    hf_model = getattr(model, "hf_model", None)
    if isinstance(hf_model, torch.nn.Module):
        hf_model.zero_grad(set_to_none=True)


def drop(model: Any, job: str) -> None:
    """Where the learner lives, after a failure: let it go."""
    pop(job, required=False)
