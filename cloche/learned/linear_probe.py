"""Linear probes trained where their point lives, with held-out accuracy.

:func:`train_linear_probe` runs the model over a dataset with one probe at the point (a
:class:`Collect`) that keeps each labelled token's activation in the process that runs the
point (:mod:`cloche.learned.live`); one ``model.call`` on that rank then fits a multinomial
logistic regression (L-BFGS, L2 penalty, on standardised activations) and measures it on the
held-out tokens. Only the probe's weights and its figures cross the wire. The result is a
:class:`LinearProbe`: ``probe.read()`` is a probe function that saves its predictions,
``probe.steer(scale)`` one that moves activations along a class direction.

Labels are computed where the model runs: ``labels`` is either one int per example (read at
the example's last real token) or a function ``labels(ctx, x)`` returning per-token labels
``(batch, seq)`` (``-1``: not labelled) or per-example ones ``(batch,)`` (read at the last real
token). ``ctx.tokens`` gives the token ids, so "is this token in a set" is one line.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.learned import live

__all__ = ["Collect", "LinearProbe", "train_linear_probe"]

_GOLDEN = 0.6180339887498949  # example id * φ mod 1: an even, fixed spread of held-out examples


def _last_real(mask: torch.Tensor | None, batch: int, seq: int, device: torch.device
               ) -> torch.Tensor:
    """The index of each row's last real token (either padding side)."""
    positions = torch.arange(seq, device=device).expand(batch, seq)
    if mask is None:
        return positions[:, -1]
    return (positions * mask.to(device).long()).argmax(dim=1)


class _Data:
    """Labelled activations gathered in this process, split into train and held-out."""

    def __init__(self) -> None:
        self.x: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
        self.y: dict[str, list[torch.Tensor]] = {"train": [], "heldout": []}
        self.tokens = 0


@dataclass(frozen=True)
class Collect:
    """The probe that gathers: labelled tokens' activations go to the job's :class:`_Data`.

    ``split``: ``"train"``, ``"heldout"``, or ``None`` to send a ``heldout`` fraction of the
    examples (by example id) to the held-out split.
    """

    job: str
    labels: Any
    split: str | None = None
    heldout: float = 0.2
    max_tokens: int = 1_000_000

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        if x.dim() != 3:
            raise UsageError(f"a linear probe reads a point of shape (batch, seq, width), not"
                             f" {tuple(x.shape)}")
        data = live.get_or_create(self.job, _Data)
        batch, seq = x.shape[:2]
        ids = ctx.example_ids
        mask = ctx.attention_mask
        if callable(self.labels):
            y = torch.as_tensor(self.labels(ctx, x)).to(x.device).long()
        else:
            if ids is None:
                raise UsageError("labels given per example need example ids")
            y = torch.tensor([int(self.labels[int(i)]) for i in ids], device=x.device)
        if y.shape == (batch,):  # one label per example, at its last real token
            full = torch.full((batch, seq), -1, dtype=torch.long, device=x.device)
            full[torch.arange(batch, device=x.device),
                 _last_real(mask, batch, seq, x.device)] = y
            y = full
        if y.shape != (batch, seq):
            raise UsageError(f"labels must be (batch,) or (batch, seq) = {(batch, seq)}, not"
                             f" {tuple(y.shape)}")
        keep = y >= 0
        if mask is not None and tuple(mask.shape) == (batch, seq):
            keep &= mask.to(x.device).bool()
        if self.split is not None:
            splits = {self.split: keep}
        else:
            rows = (ids if ids is not None else torch.arange(batch)).to(x.device).double()
            held = ((rows * _GOLDEN) % 1.0 < self.heldout).unsqueeze(1)
            splits = {"train": keep & ~held, "heldout": keep & held}
        for name, where in splits.items():
            if data.tokens >= self.max_tokens:
                return None
            data.x[name].append(x[where].detach().float())
            data.y[name].append(y[where])
            data.tokens += int(where.sum())
        return None


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(-1) == y).double().mean()) if len(y) else float("nan")


def _fit(model: Any, job: str, steps: int, l2: float, seed: int) -> dict[str, Any]:
    """On the owning rank: fit the probe on the gathered tokens and measure it."""
    data = live.pop(job)
    if not data.x["train"]:
        raise UsageError("no labelled tokens reached the probe: check the labels")
    x = torch.cat(data.x["train"])
    y = torch.cat(data.y["train"])
    n_classes = max(2, int(y.max()) + 1)
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        weight = torch.zeros(n_classes, x.shape[1], device=x.device, requires_grad=True)
        bias = torch.zeros(n_classes, device=x.device, requires_grad=True)
    finally:
        torch.random.set_rng_state(generator_state)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (torch.nn.functional.cross_entropy(z @ weight.T + bias, y)
                + l2 * weight.pow(2).sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():  # fold the standardisation into the weights: logits = x @ W.T + b
        w = weight / std
        b = bias - (mean / std) @ weight.T
        out: dict[str, Any] = {"weight": w.cpu(), "bias": b.cpu(), "classes": n_classes,
                               "train_accuracy": _accuracy(x @ w.T + b, y),
                               "n_train": len(y)}
        if data.x["heldout"]:
            xh, yh = torch.cat(data.x["heldout"]), torch.cat(data.y["heldout"])
            counts = torch.bincount(yh, minlength=n_classes)
            out.update(accuracy=_accuracy(xh @ w.T + b, yh), n_heldout=len(yh),
                       chance=float(counts.max()) / len(yh))
        else:
            out.update(accuracy=float("nan"), n_heldout=0, chance=float("nan"))
    return out


@dataclass(frozen=True)
class _Read:
    weight: torch.Tensor
    bias: torch.Tensor
    key: str
    probabilities: bool

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        logits = x.float() @ self.weight.to(x.device).T + self.bias.to(x.device)
        ctx.save(self.key, logits.softmax(-1) if self.probabilities else logits.argmax(-1))
        return None


@dataclass(frozen=True)
class _Add:
    direction: torch.Tensor

    def __call__(self, ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x + self.direction.to(device=x.device, dtype=x.dtype)


@dataclass
class LinearProbe:
    """A trained linear probe: ``logits = x @ weight.T + bias`` over ``classes`` classes."""

    point: str
    weight: torch.Tensor
    bias: torch.Tensor
    accuracy: float  #: on the held-out tokens
    train_accuracy: float
    chance: float  #: the held-out share of the most common class
    n_train: int
    n_heldout: int
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> int:
        return int(self.weight.shape[0])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits for activations ``x`` (..., width), here."""
        return x.float() @ self.weight.to(x.device).T + self.bias.to(x.device)

    def read(self, key: str = "probe", *, probabilities: bool = False) -> Callable[..., None]:
        """A probe function for ``probes={probe.point: ...}`` that saves, under ``key``, each
        token's predicted class (or class probabilities)."""
        return _Read(self.weight, self.bias, key, probabilities)

    def direction(self, target: int = 1, against: int = 0) -> torch.Tensor:
        """The unit direction that raises class ``target``'s logit over ``against``'s."""
        d = self.weight[target] - self.weight[against]
        return d / d.norm().clamp_min(1e-12)

    def steer(self, scale: float, target: int = 1, against: int = 0) -> Callable[..., Any]:
        """A probe function that adds ``scale`` times :meth:`direction` at every token."""
        return _Add(scale * self.direction(target, against))


def train_linear_probe(model: Any, point: str, data: Any,
                       labels: Sequence[int] | Callable[[Any, torch.Tensor], Any], *,
                       heldout: float | Any = 0.2, heldout_labels: Any = None,
                       batch_size: int = 8,
                       limit: int | None = None, steps: int = 200, l2: float = 1e-4,
                       max_tokens: int = 1_000_000, seed: int = 0,
                       progress: bool | Callable[[dict[str, Any]], None] | None = True,
                       cancel: Any = None) -> LinearProbe:
    """Train a linear probe on the activations at ``point`` over ``data``, where it lives.

    ``data`` is what ``run_dataset`` takes (texts, a ``cloche.data.Dataset``, a name);
    ``labels`` one int per example or a function ``labels(ctx, x)`` run next to the model (see
    the module docs). ``heldout``: the fraction of examples held out, or a second dataset
    labelled by ``heldout_labels`` (default: ``labels``) to measure on. At most
    ``max_tokens`` labelled tokens are kept. ``steps``: L-BFGS iterations; ``l2``: the weight
    penalty.
    """
    if not callable(labels) and not isinstance(labels, Sequence):
        raise UsageError(f"labels must be a sequence of ints or a function (ctx, x), not"
                         f" {type(labels).__name__}")
    split_fraction = isinstance(heldout, float | int) and not isinstance(heldout, bool)
    if split_fraction and not 0 <= float(heldout) < 1:
        raise UsageError(f"heldout must be a fraction in [0, 1) or a dataset, not {heldout!r}")
    point = model.resolve(point)
    owner = model.owner_of(point)
    job = f"probe:{uuid.uuid4().hex}"

    def gather(dataset: Any, split: str | None, labels: Any) -> Callable[[str], object]:
        probe = Collect(job, labels if callable(labels) else tuple(labels), split,
                        float(heldout) if split_fraction else 0.0, max_tokens)
        return lambda save: model.run_dataset(dataset, probes={point: probe}, save=save,
                                              batch_size=batch_size, limit=limit,
                                              progress=progress, cancel=cancel)

    passes = [gather(data, None if split_fraction else "train", labels)]
    if not split_fraction:
        passes.append(gather(heldout, "heldout",
                             labels if heldout_labels is None else heldout_labels))
    out = live.train(model, job, passes, owner=owner, finish=_fit, args=(steps, l2, seed))
    return LinearProbe(point=point, weight=out["weight"], bias=out["bias"],
                       accuracy=out["accuracy"], train_accuracy=out["train_accuracy"],
                       chance=out["chance"], n_train=out["n_train"],
                       n_heldout=out["n_heldout"])
