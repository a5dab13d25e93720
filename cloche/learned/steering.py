"""Steering vectors optimised where their point lives to raise a target's log-probability.

:func:`train_steering_vector` runs ``steps`` forward and backward passes over the prompts, each
followed by the target's tokens. A probe at the point (a :class:`SteerTrain`) adds the vector,
which lives with its Adam optimizer in the process that runs the point
(:mod:`cloche.learned.live`); the backward objective is minus the target's log-probability, so
each backward pass leaves the vector's gradient there, and the next pass's probe takes the
optimizer step before adding it. Only the vector trains: the model's weights get gradients
from the backward pass (cleared at the end) but no optimizer ever sees them, so they are
unchanged. The result is a :class:`SteeringVector`: ``vector.steer(scale)`` is a probe function
that adds it, ``vector.read()`` one that saves each token's projection on it.
:func:`target_logprob` measures log p(target | prompt), with or without probes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.learned import live
from cloche.learned.linear_probe import _Add

__all__ = ["SteerTrain", "SteeringVector", "target_logprob", "train_steering_vector"]


class _Vector:
    """The vector being trained and its optimizer, in the process that runs the point."""

    def __init__(self, width: int, device: torch.device, lr: float,
                 max_norm: float | None) -> None:
        self.vector = torch.zeros(width, device=device, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.vector], lr=lr)
        self.max_norm = max_norm
        self.steps = 0

    def step(self) -> None:
        """The optimizer step for the last backward pass, if there was one."""
        if self.vector.grad is None:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.max_norm is not None:
            with torch.no_grad():
                norm = self.vector.norm()
                if norm > self.max_norm:
                    self.vector.mul_(self.max_norm / norm)


@dataclass(frozen=True)
class SteerTrain:
    """The probe that trains: steps the optimizer, then adds the (live) vector to ``x``."""

    job: str
    lr: float
    max_norm: float | None = None

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        learner = live.get_or_create(
            self.job, lambda: _Vector(x.shape[-1], x.device, self.lr, self.max_norm))
        learner.step()
        return x + learner.vector.to(x.dtype)


@dataclass(frozen=True)
class _TargetLoss:
    """The backward objective: minus the mean (over rows) log-probability of the target,
    whose tokens start at ``starts[i]`` in row ``i``."""

    starts: torch.Tensor
    target: torch.Tensor

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row: log p(target | prompt)."""
        device = logits.device
        rows = torch.arange(len(self.starts), device=device).unsqueeze(1)
        positions = (self.starts.to(device).unsqueeze(1) - 1
                     + torch.arange(len(self.target), device=device))
        picked = logits[rows, positions].float().log_softmax(-1)  # (rows, T, vocab)
        target = self.target.to(device).expand(len(self.starts), -1)
        return picked.gather(-1, target.unsqueeze(-1)).squeeze(-1).sum(-1)

    def __call__(self, outputs: Any) -> torch.Tensor:
        return -self.log_probs(outputs.logits).mean()


def _vector_of(learner: Any) -> dict[str, Any]:
    return {"vector": learner.vector.detach().cpu(), "steps": learner.steps}


def _ids(model: Any, text: Any, *, special: bool) -> list[int]:
    if isinstance(text, str):
        if special:
            return [int(i) for i in model.tokenize(text)]
        if model.tokenizer is None:
            raise UsageError("text needs a tokenizer: give token ids instead")
        return [int(i) for i in model.tokenizer(text, add_special_tokens=False)["input_ids"]]
    ids = torch.as_tensor(text).flatten()
    if ids.dtype not in (torch.int32, torch.int64) or ids.numel() == 0:
        raise UsageError(f"a prompt or target is text or a non-empty list of token ids, not"
                         f" {text!r}")
    return [int(i) for i in ids]


def _batch(model: Any, prompts: Sequence[Any], target: list[int]
           ) -> tuple[dict[str, torch.Tensor], _TargetLoss]:
    """The prompts each followed by the target, right-padded, and the objective that reads it."""
    rows = [_ids(model, p, special=True) + target for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    starts = torch.tensor([len(r) - len(target) for r in rows])
    if int(starts.min()) < 1:
        raise UsageError("every prompt needs at least one token before the target")
    return ({"input_ids": ids, "attention_mask": mask},
            _TargetLoss(starts, torch.tensor(target)))


def target_logprob(model: Any, prompts: Sequence[Any], target: Any, *,
                   probes: dict[str, Any] | None = None, batch_size: int = 8) -> torch.Tensor:
    """log p(target | prompt) for each prompt (text or token ids), with ``probes`` attached."""
    target_ids = _ids(model, target, special=False)
    out = []
    for start in range(0, len(prompts), batch_size):
        inputs, loss = _batch(model, list(prompts[start:start + batch_size]), target_ids)
        result = model.run(inputs, probes=probes, progress=False)
        out.append(loss.log_probs(result.logits))
    return torch.cat(out)


@dataclass
class SteeringVector:
    """A trained steering vector at ``point``."""

    point: str
    vector: torch.Tensor
    steps: int

    def steer(self, scale: float = 1.0) -> Callable[..., Any]:
        """A probe function that adds ``scale`` times the vector at every token."""
        return _Add(scale * self.vector)

    def read(self, key: str = "steering") -> Callable[..., None]:
        """A probe function that saves, under ``key``, each token's projection on the unit
        vector."""
        return _Project(self.vector / self.vector.norm().clamp_min(1e-12), key)


@dataclass(frozen=True)
class _Project:
    direction: torch.Tensor
    key: str

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        ctx.save(self.key, x.float() @ self.direction.to(x.device))
        return None


def train_steering_vector(model: Any, point: str, prompts: Sequence[Any], target: Any, *,
                          steps: int = 100, lr: float = 1e-2, batch_size: int = 8,
                          max_norm: float | None = None, cancel: Any = None) -> SteeringVector:
    """Optimise a vector added at ``point`` (every token) so that the model continues each of
    ``prompts`` (text or token ids) with ``target`` (text, without special tokens, or token
    ids): ``steps`` Adam steps of rate ``lr`` on minus the mean log p(target | prompt), over
    batches of ``batch_size`` prompts in turn. ``max_norm`` bounds the vector's norm. The
    model's weights are not changed. ``cancel`` (a ``threading.Event``) stops at the next step
    and raises; the server keeps nothing of the job.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive int, not {steps!r}")
    if not prompts:
        raise UsageError("train_steering_vector needs at least one prompt")
    point = model.resolve(point)
    owner = model.owner_of(point)
    target_ids = _ids(model, target, special=False)
    batches = [_batch(model, list(prompts[i:i + batch_size]), target_ids)
               for i in range(0, len(prompts), batch_size)]
    job = f"steer:{uuid.uuid4().hex}"
    out = live.optimise(model, point, job, SteerTrain(job, lr, max_norm), batches, steps,
                        owner=owner, result=_vector_of, cancel=cancel)
    return SteeringVector(point=point, vector=out["vector"], steps=out["steps"])
