"""Distributed alignment search (Geiger et al. 2023; pyvene's ``RotatedSpaceIntervention``):
a rotation at a point whose first ``dim`` coordinates carry a causal variable.

Each training batch holds base prompts and, after them, as many source prompts; at the point
the probe (a :class:`DasTrain`) swaps, at each base's chosen position, the ``dim`` rotated
coordinates of the base for those of its source: ``h' = h_b + Wᵀ(W h_s − W h_b)``, where ``W``
(``dim`` × width) has orthonormal rows (``torch.nn.utils.parametrizations.orthogonal``). The
objective is the cross-entropy of each base's next token, at its last real token, against the
counterfactual target. Only ``W`` trains, in the process that runs the point
(:mod:`cloche.learned.live`); as for steering vectors, each pass's probe takes the optimizer
step of the pass before, and the weights are untouched. The result's
:meth:`DasRotation.intervene` is the same swap as a probe function (for batches laid out the
same way), and :func:`interchange_accuracy` measures it on held-out pairs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.learned import live

__all__ = ["DasRotation", "DasTrain", "interchange_accuracy", "train_das"]


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return (positions * mask.long()).argmax(dim=1)


def _swap(x: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The interchange at each base row's last real token: rows [0, n) are bases, [n, 2n)
    their sources."""
    if x.dim() != 3 or x.shape[0] % 2:
        raise UsageError(f"an interchange needs (2 * pairs, seq, width) activations, not"
                         f" {tuple(x.shape)}")
    n = x.shape[0] // 2
    if mask is None:
        last = torch.full((x.shape[0],), x.shape[1] - 1, device=x.device)
    else:
        last = _last_real(mask.to(x.device))
    rows = torch.arange(n, device=x.device)
    base = x[rows, last[:n]]
    source = x[rows + n, last[n:]]
    w = w.to(x.dtype)
    patched = base + (source - base) @ w.T @ w
    out = x.clone()
    out[rows, last[:n]] = patched
    return out


class _Rotation:
    """The rotation being trained and its optimizer, in the process that runs the point."""

    def __init__(self, width: int, dim: int, device: torch.device, lr: float, seed: int) -> None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            linear = torch.nn.Linear(width, dim, bias=False, device=device)
            # the parametrization completes the rows into a square orthogonal base with random
            # columns, which steer every step after: they are seeded too, or the same seed
            # trains a different rotation in each process
            self.module = torch.nn.utils.parametrizations.orthogonal(linear)
        finally:
            torch.random.set_rng_state(generator_state)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=lr)
        self.steps = 0
        self.pending = False

    def weight(self) -> torch.Tensor:
        """The (``dim`` × width) rows, orthonormal by the parametrization."""
        weight = self.module.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    def step(self) -> None:
        if not self.pending:
            return
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        self.pending = False


@dataclass(frozen=True)
class DasTrain:
    """The probe that trains: steps the optimizer, then swaps through the live rotation."""

    job: str
    dim: int
    lr: float
    seed: int = 0

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        learner = live.get_or_create(
            self.job, lambda: _Rotation(x.shape[-1], self.dim, x.device, self.lr, self.seed))
        learner.step()
        learner.pending = True
        with torch.enable_grad():
            return _swap(x, learner.weight(), ctx.attention_mask)


@dataclass(frozen=True)
class _Counterfactual:
    """The objective: cross-entropy of each base's next token against its target."""

    targets: torch.Tensor

    def __call__(self, outputs: Any) -> torch.Tensor:
        n = len(self.targets)
        last = _last_real(outputs.attention_mask[:n])
        logits = outputs.logits[torch.arange(n, device=last.device), last].float()
        return torch.nn.functional.cross_entropy(logits, self.targets.to(logits.device))


@dataclass(frozen=True)
class _Intervene:
    weight: torch.Tensor

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return _swap(x, self.weight.to(x.device), ctx.attention_mask)


@dataclass
class DasRotation:
    """A trained DAS rotation at ``point``: ``weight`` (``dim`` × width), orthonormal rows."""

    point: str
    weight: torch.Tensor
    steps: int

    def intervene(self) -> Callable[..., Any]:
        """A probe function: in a batch of bases followed by as many sources, each base's last
        real token takes its source's ``dim`` rotated coordinates."""
        return _Intervene(self.weight)

    def read(self, key: str = "das") -> Callable[..., None]:
        """A probe function that saves each token's ``dim`` rotated coordinates."""
        return _Read(self.weight, key)


@dataclass(frozen=True)
class _Read:
    weight: torch.Tensor
    key: str

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        ctx.save(self.key, x.float() @ self.weight.to(x.device).T)
        return None


def _pairs(model: Any, bases: Sequence[Any], sources: Sequence[Any], targets: Sequence[Any]
           ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    if not (len(bases) == len(sources) == len(targets)) or not bases:
        raise UsageError(f"bases, sources and targets must be non-empty and as long as each"
                         f" other, not {len(bases)}, {len(sources)}, {len(targets)}")
    rows = [model.tokenize(t) if isinstance(t, str) else torch.as_tensor(t).flatten()
            for t in [*bases, *sources]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    target_ids = []
    for t in targets:
        if isinstance(t, str):
            t = model.tokenizer(t, add_special_tokens=False)["input_ids"][0]
        target_ids.append(int(t))
    return {"input_ids": ids, "attention_mask": mask}, torch.tensor(target_ids)


def interchange_accuracy(model: Any, point: str, bases: Sequence[Any], sources: Sequence[Any],
                         targets: Sequence[Any], probe: Callable[..., Any] | None) -> float:
    """The share of pairs whose base, with ``probe`` at ``point`` (e.g.
    ``rotation.intervene()``; None for none), predicts its target next."""
    inputs, target_ids = _pairs(model, bases, sources, targets)
    result = model.run(inputs, probes={point: probe} if probe is not None else None,
                       progress=False)
    n = len(target_ids)
    last = _last_real(inputs["attention_mask"][:n])
    predicted = result.logits[torch.arange(n), last].argmax(-1).cpu()
    return float((predicted == target_ids).double().mean())


def _weight_of(learner: Any) -> dict[str, Any]:
    return {"weight": learner.weight().detach().cpu(), "steps": learner.steps}


def train_das(model: Any, point: str, bases: Sequence[Any], sources: Sequence[Any],
              targets: Sequence[Any], *, dim: int = 1, steps: int = 100, lr: float = 1e-2,
              batch_size: int = 8, seed: int = 0, cancel: Any = None) -> DasRotation:
    """Train a ``dim``-dimensional DAS subspace at ``point`` (at each prompt's last real token)
    so that a base prompt, given its source's subspace, predicts ``targets`` (the
    counterfactual next token: text or a token id) next."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise UsageError(f"steps must be a positive int, not {steps!r}")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise UsageError(f"dim must be a positive int, not {dim!r}")
    point = model.resolve(point)
    owner = model.owner_of(point)
    batches = [_pairs(model, bases[i:i + batch_size], sources[i:i + batch_size],
                      targets[i:i + batch_size]) for i in range(0, len(bases), batch_size)]
    job = f"das:{uuid.uuid4().hex}"
    out = live.optimise(model, point, job, DasTrain(job, dim, lr, seed),
                        [(inputs, _Counterfactual(ids)) for inputs, ids in batches], steps,
                        owner=owner, result=_weight_of, cancel=cancel)
    return DasRotation(point=point, weight=out["weight"], steps=out["steps"])
