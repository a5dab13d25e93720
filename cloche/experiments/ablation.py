"""Ablations: knock out heads, neurons, layers or directions and measure the loss.

A target names what to remove:

- ``"layers.1.attn.head.3"`` — head 3's slice of ``layers.1.attn.z`` (its output before W_O);
- ``("layers.1.mlp.post", [5, 9])`` — those units of a point (indices into the dimension
  after (batch, seq): neurons, or heads for ``attn.z``);
- ``("layers.0.resid_post", direction)`` — the component along a direction (a float vector);
- ``"layers.1.attn"`` / ``"layers.1.mlp"`` — the whole attention / MLP output of a layer;
  any other point name — the whole activation at that point.

Methods: ``"zero"``; ``"mean"`` (the mean over ``mean_over``, default the inputs themselves,
computed on the server with the Mean reducer); ``"resample"`` (the activation of the next row
of the same batch — rows are rolled by one — so batches need at least two rows).

The loss is the mean next-token cross-entropy over all real tokens, computed by a probe on the
logits and reduced on the server; ``loss_on`` restricts it to some target positions. The clean
run attaches identity probes at the same points, so both runs take the same code path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import (
    as_dataset_arg,
    as_tensor,
    inputs_or_dataset,
    is_direction,
    reports,
    scratch,
)

__all__ = [
    "METHODS",
    "AblationResult",
    "Target",
    "ablate",
    "ablation_sweep",
    "loss",
    "parse_target",
]

METHODS = ("zero", "mean", "resample")


@dataclass(frozen=True)
class Target:
    """One thing to ablate: a probe point and which part of it (all / indices / a direction)."""

    point: str
    kind: str  # "all" | "index" | "direction"
    value: Any = None
    label: str = ""


@dataclass(frozen=True)
class AblationResult:
    """Losses without (``loss_clean``) and with (``loss_ablated``) the ablation."""

    loss_clean: float
    loss_ablated: float
    method: str
    targets: list[str]
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def delta(self) -> float:
        return self.loss_ablated - self.loss_clean

    @property
    def relative(self) -> float:
        """(ablated - clean) / clean: 0.5 means the loss went up by 50%."""
        return self.delta / self.loss_clean

    def __iter__(self) -> Any:  # ``clean, ablated = ablate(...)``
        return iter((self.loss_clean, self.loss_ablated))


def parse_target(model: Any, target: Any) -> list[Target]:
    """Turn one user target into :class:`Target` objects (``"layers.1"`` gives two)."""
    if isinstance(target, Target):
        return [target]
    if isinstance(target, str):
        parts = target.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[2] == "attn" and parts[3] == "head":
            head = int(parts[4])
            if not 0 <= head < int(model.n_heads):
                raise UsageError(f"{target!r}: head {head} is out of range ({model.n_heads} heads)")
            return [Target(f"layers.{parts[1]}.attn.z", "index", [head], target)]
        if len(parts) == 2 and parts[0] == "layers" and parts[1].isdigit():
            return [Target(f"{target}.attn.out", "all", None, f"{target}.attn"),
                    Target(f"{target}.mlp.out", "all", None, f"{target}.mlp")]
        if len(parts) == 3 and parts[0] == "layers" and parts[2] in ("attn", "mlp"):
            return [Target(f"{target}.out", "all", None, target)]
        return [Target(model.resolve(target), "all", None, target)]
    if isinstance(target, tuple) and len(target) == 2 and isinstance(target[0], str):
        point, what = model.resolve(target[0]), target[1]
        if is_direction(what):
            d = as_tensor(what, torch.float32).reshape(-1)
            norm = float(d.norm())
            if norm == 0:
                raise UsageError(f"the direction for {point!r} is zero")
            return [Target(point, "direction", d / norm, f"{point} (direction)")]
        idx = [int(what)] if isinstance(what, (int, np.integer)) else [int(i) for i in what]
        return [Target(point, "index", idx, f"{point}{idx}")]
    raise UsageError(f"cannot read ablation target {target!r}: use 'layers.L.attn.head.H', "
                     "('point', [units]), ('point', direction) or a point name")


def _targets(model: Any, targets: Any) -> list[Target]:
    if isinstance(targets, (str, Target)) or (
            isinstance(targets, tuple) and len(targets) == 2 and isinstance(targets[0], str)
            and not isinstance(targets[1], str)):
        targets = [targets]
    parsed = [t for target in targets for t in parse_target(model, target)]
    if not parsed:
        raise UsageError("no ablation targets given")
    return parsed


def _loss_probe(name: str, positions: Any) -> Any:
    def loss_probe(ctx: Any, logits: torch.Tensor) -> None:
        import torch.nn.functional as F

        from cloche import Mean

        tokens = ctx.tokens.to(logits.device)
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                             reduction="none")  # ce[:, j] is the loss of target j + 1
        mask = ctx.attention_mask
        keep = torch.ones_like(ce, dtype=torch.bool) if mask is None else (
            (mask[:, 1:] * mask[:, :-1]).to(ce.device).bool())
        if positions is not None:
            chosen = torch.zeros(ce.shape[1] + 1, dtype=torch.bool, device=ce.device)
            chosen[positions] = True
            keep = keep & chosen[1:]
        ctx.reduce(name, ce[keep][:, None], Mean())

    return loss_probe


def _identity(ctx: Any, x: torch.Tensor) -> None:
    return None


def _ablation_probe(target: Target, method: str, mean: torch.Tensor | None) -> Any:
    kind, value = target.kind, target.value

    def ablation_probe(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        if method == "zero":
            source = torch.zeros_like(x)
        elif method == "mean":
            assert mean is not None, "mean ablation needs the means"
            source = mean.to(x).reshape(x.shape[2:]).expand_as(x)
        else:
            if x.shape[0] < 2:
                raise UsageError("resample ablation takes the activation of another row of the "
                                 "batch: use batch_size >= 2 (and at least two inputs)")
            source = x.roll(1, 0)
        if kind == "all":
            return source.clone()
        y = x.clone()
        if kind == "index":
            y[:, :, value] = source[:, :, value]
            return y
        u = value.to(x)
        flat, src = x.flatten(2), source.flatten(2)
        shift = ((src - flat) @ u)[..., None] * u
        return (flat + shift).reshape(x.shape)

    return ablation_probe


def _means(model: Any, targets: list[Target], dataset: Any, batch_size: int,
           limit: int | None, cancel: Any = None) -> dict[str, torch.Tensor]:
    """Mean activation (flattened trailing dims) of each target point over ``dataset``."""
    points = sorted({t.point for t in targets})

    def mean_probe(ctx: Any, x: torch.Tensor) -> None:
        from cloche import Mean

        ctx.reduce(ctx.point, x.flatten(2), Mean())

    with scratch(model, "mean") as name:
        out = model.run_dataset(dataset, probes=dict.fromkeys(points, mean_probe), save=name,
                                batch_size=batch_size, limit=limit, cancel=cancel)
    return {p: torch.as_tensor(out["reducers"][p]["mean"]).float() for p in points}


def _probes_for(targets: list[Target], method: str, means: dict[str, torch.Tensor] | None
                ) -> dict[str, list[Any]]:
    probes: dict[str, list[Any]] = {}
    for t in targets:
        mean = means.get(t.point) if means else None
        probes.setdefault(t.point, []).append(_ablation_probe(t, method, mean))
    return probes


def _metric_probe(metric: Any, name: str) -> Any:
    def metric_probe(ctx: Any, logits: torch.Tensor) -> None:
        from cloche import Mean

        values = metric(logits, ctx.tokens.to(logits.device))
        ctx.reduce(name, values.detach().double().reshape(-1, 1), Mean())

    return metric_probe


@reports
def loss(model: Any, inputs: Any = None, *, dataset: Any = None,
         probes: dict[str, Any] | None = None, loss_on: Any = None, metric: Any = None,
         batch_size: int = 8, limit: int | None = None, progress: Any = True
         ) -> tuple[float, int]:
    """(mean next-token loss, number of target tokens) of ``inputs`` (a text, texts or token
    ids) or of ``dataset`` (a name, path or Dataset) with ``probes`` attached, reduced on the
    server.

    With ``metric`` (``fn(logits, tokens) -> (batch,)``, run on the server, e.g.
    :func:`cloche.experiments.patching.logit_diff`) the first value is the metric's mean over
    the rows instead of the loss.
    """
    return _loss(model, inputs_or_dataset(inputs, dataset), probes=probes, loss_on=loss_on,
                 metric=metric, batch_size=batch_size, limit=limit, progress=progress)


def _loss(model: Any, dataset: Any, *, probes: dict[str, Any] | None = None,
          loss_on: Any = None, metric: Any = None, batch_size: int = 8,
          limit: int | None = None, progress: Any = True, cancel: Any = None
          ) -> tuple[float, int]:
    """:func:`loss` on what ``run_dataset`` takes (already resolved)."""
    all_probes: dict[str, list[Any]] = {p: list(v) if isinstance(v, list) else [v]
                                        for p, v in (probes or {}).items()}
    reader = _metric_probe(metric, "loss") if metric is not None else _loss_probe(
        "loss", _positions(loss_on))
    all_probes.setdefault("logits", []).append(reader)
    with scratch(model, "loss") as name:
        out = model.run_dataset(dataset, probes=all_probes, save=name, batch_size=batch_size,
                                limit=limit, progress=progress, cancel=cancel)
    result = out["reducers"]["loss"]
    return float(result["mean"][0]), int(result["count"])


def _positions(loss_on: Any) -> Any:
    if loss_on is None or isinstance(loss_on, slice):
        return loss_on
    return torch.as_tensor(list(loss_on), dtype=torch.long)


@reports
def ablate(model: Any, targets: Any, inputs: Any = None, method: str = "zero", *,
           dataset: Any = None, mean_over: Any = None, loss_on: Any = None, metric: Any = None,
           batch_size: int = 8, limit: int | None = None, progress: Any = True,
           cancel: Any = None) -> AblationResult:
    """Loss on ``inputs`` with and without ablating ``targets`` (see the module docstring).

    ``inputs``: a text (a ``str`` is always text), a list of texts or token ids; or instead
    ``dataset=``: a dataset name or path, or a Dataset. ``mean_over`` (for ``method="mean"``):
    a dataset name, Dataset, texts or token ids.
    ``loss_on``: a slice or list of token positions whose prediction counts (e.g.
    ``slice(L + 1, None)`` for the repeated half of a twice-repeated sequence of length L).
    ``metric``: also measure ``fn(logits, tokens) -> (batch,)`` on chosen logits (e.g.
    ``logit_diff(correct, wrong)``), with and without: ``result.extra["metric_clean"]`` and
    ``result.extra["metric_ablated"]`` (means over the rows). ``progress``: a bar over the
    dataset passes (2, 3 with ``method="mean"``, 2 more with ``metric``); ``False``: none.
    ``cancel``: an event (e.g. ``threading.Event``) whose ``set()`` stops the dataset passes
    where they run, raising :class:`cloche.errors.Cancelled`.
    """
    if method not in METHODS:
        raise UsageError(f"method must be one of {METHODS}, not {method!r}")
    parsed = _targets(model, targets)
    dataset = inputs_or_dataset(inputs, dataset)
    progress.expect(2 + (method == "mean") + 2 * (metric is not None), "pass")
    means = None
    if method == "mean":
        source = dataset if mean_over is None else as_dataset_arg(mean_over)
        means = _means(model, parsed, source, batch_size, limit, cancel)
        progress.step()
    identity = {t.point: [_identity] for t in parsed}
    clean, n = _loss(model, dataset, probes=identity, loss_on=loss_on, batch_size=batch_size,
                     limit=limit, progress=progress, cancel=cancel)
    progress.step()
    ablation = _probes_for(parsed, method, means)
    ablated, _ = _loss(model, dataset, probes=ablation, loss_on=loss_on, batch_size=batch_size,
                       limit=limit, progress=progress, cancel=cancel)
    progress.step()
    extra: dict[str, Any] = {}
    if metric is not None:
        extra["metric_clean"], _ = _loss(model, dataset, probes=identity, metric=metric,
                                         batch_size=batch_size, limit=limit, cancel=cancel)
        progress.step()
        extra["metric_ablated"], _ = _loss(model, dataset, probes=ablation, metric=metric,
                                           batch_size=batch_size, limit=limit, cancel=cancel)
        progress.step()
    return AblationResult(clean, ablated, method, [t.label for t in parsed], n, extra)


@reports
def ablation_sweep(model: Any, inputs: Any = None, *, dataset: Any = None, kind: str = "heads",
                   layers: Any = None, method: str = "zero", loss_on: Any = None,
                   batch_size: int = 8,
                   limit: int | None = None, mean_over: Any = None, progress: Any = True
                   ) -> tuple[float, np.ndarray]:
    """Ablate every head (``kind="heads"``) or every neuron (``kind="neurons"``) of ``layers``
    (default: all) one at a time; returns (clean loss, ablated losses (n_layers, n_units))
    with NaN rows for layers not swept. ``progress``: a bar over the units (``False``: none)."""
    if kind not in ("heads", "neurons"):
        raise UsageError(f"kind must be 'heads' or 'neurons', not {kind!r}")
    n_layers = int(model.n_layers)
    layers = list(range(n_layers)) if layers is None else (
        [layers] if isinstance(layers, int) else list(layers))
    width = int(model.n_heads) if kind == "heads" else int(model.d_mlp)
    dataset = inputs_or_dataset(inputs, dataset)
    point_of = (lambda i: f"layers.{i}.attn.z") if kind == "heads" else (
        lambda i: f"layers.{i}.mlp.post")
    progress.expect(len(layers) * width, "unit")
    means = None
    if method == "mean":
        source = dataset if mean_over is None else as_dataset_arg(mean_over)
        means = _means(model, [Target(point_of(i), "all") for i in layers], source,
                       batch_size, limit)
    clean, _ = _loss(model, dataset, probes={point_of(i): [_identity] for i in layers},
                     loss_on=loss_on, batch_size=batch_size, limit=limit)
    table = np.full((n_layers, width), np.nan)
    for layer in layers:
        for unit in range(width):
            t = Target(point_of(layer), "index", [unit])
            table[layer, unit], _ = _loss(model, dataset, probes=_probes_for([t], method, means),
                                          loss_on=loss_on, batch_size=batch_size, limit=limit)
            progress.step()
    return clean, table
