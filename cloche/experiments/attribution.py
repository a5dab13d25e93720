"""Attribution patching: a first-order estimate of every activation patch from two passes.

Real activation patching (:mod:`cloche.experiments.patching`) costs a forward pass per cell.
Attribution patching (Nanda 2023; Syed et al. 2023) estimates the effect on a metric ``M`` of
putting the corrupted activation ``a*`` in place of the clean one ``a`` at every point and
position at once, linearly: ``M(a*) - M(a) ≈ (a* - a) · dM/da``, with the gradient taken on the
clean run. Here that is one forward + backward pass on the clean input and one forward pass on
the corrupted input, whatever the number of points.

Everything heavy stays where the model runs: the clean run's probes keep its activations and
the gradients in the scratch save context's ``ctx.state``; the corrupted run's probes form
``(corrupted - clean) * grad``, sum it over the hidden dimension and the batch, and save only
that — one number per position (per head at per-head points, per feature at a dictionary's
features point). So it runs unchanged on a local, remote or sharded model.

The metric is the patching one, ``fn(logits, tokens) -> (batch,)`` (e.g.
:func:`~cloche.experiments.patching.logit_diff`), so the two can be compared cell by cell;
scores estimate the change of its batch mean. Without a metric it is the log-probability, at
the last position, of the token the clean run predicts there (chosen on the clean run, and the
same token is scored on the corrupted run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import reports, scratch
from cloche.experiments.patching import Metric, _pair

__all__ = ["DEFAULT_SUFFIXES", "AttributionResult", "attribution_patching"]

#: The points scored by default, per layer: the residual stream, each attention head's output
#: (``attn.z``, per head), the attention and MLP outputs.
DEFAULT_SUFFIXES = ("resid_pre", "attn.z", "attn.out", "mlp.out", "resid_post")

_ANSWER = "attribution:answer"


def _answer_logprob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    last = logits[:, -1].float().log_softmax(-1)
    return last.gather(-1, answer.to(last.device).reshape(-1, 1)).reshape(-1)


def _clean_metric_probe(metric: Metric | None) -> Any:
    def clean_metric_probe(ctx: Any, logits: torch.Tensor) -> None:
        if metric is None:
            answer = logits[:, -1].detach().argmax(-1)
            ctx.state[_ANSWER] = answer
            value = _answer_logprob(logits.detach(), answer)
        else:
            value = metric(logits.detach(), ctx.tokens.to(logits.device))
        ctx.save("clean", value.detach().float().reshape(-1))

    return clean_metric_probe


def _corrupted_metric_probe(metric: Metric | None) -> Any:
    def corrupted_metric_probe(ctx: Any, logits: torch.Tensor) -> None:
        if metric is None:
            value = _answer_logprob(logits, ctx.state.pop(_ANSWER))
        else:
            value = metric(logits, ctx.tokens.to(logits.device))
        ctx.save("corrupted", value.detach().float().reshape(-1))

    return corrupted_metric_probe


def _objective(metric: Metric | None) -> Callable[[Any], torch.Tensor]:
    """What the clean run backprops: the batch mean of the metric (so that summing
    ``diff * grad`` over the batch gives the change of the mean)."""

    def attribution_objective(outputs: Any) -> torch.Tensor:
        logits = outputs.logits
        if metric is None:
            return _answer_logprob(logits, logits[:, -1].detach().argmax(-1)).mean()
        return metric(logits, outputs.tokens.to(logits.device)).float().mean()

    return attribution_objective


def _keep_clean(ctx: Any, x: torch.Tensor) -> None:
    ctx.state[f"clean:{ctx.point}"] = x.detach().clone()


def _keep_grad(ctx: Any, grad: torch.Tensor) -> None:
    ctx.state[f"grad:{ctx.point}"] = grad.detach().clone()


def _attribute(keep: str) -> Any:
    """The corrupted run's probe: ``(corrupted - clean) * grad`` summed over the batch and the
    hidden dimension; ``keep`` is ``"head"`` (keep axis 2 of a per-head point), ``"unit"``
    (keep every unit: dictionary features) or ``"position"``."""

    def attribute(ctx: Any, x: torch.Tensor) -> None:
        clean = ctx.state.pop(f"clean:{ctx.point}").float()
        grad = ctx.state.pop(f"grad:{ctx.point}", None)
        if grad is None:
            raise UsageError(f"no gradient of the metric reached {ctx.point!r}: attribution"
                             " needs points that the logits depend on")
        grad = grad.float()
        product = (x.detach().float().to(clean.device) - clean) * grad
        per_row = product.sum(0)  # (seq, ...)
        if keep == "head":
            scores = per_row.flatten(2).sum(-1)
        elif keep == "unit":
            scores = per_row.flatten(1)
        else:
            scores = per_row.flatten(1).sum(-1)
        ctx.save(f"attribution:{ctx.point}", scores)

    return attribute


def default_points(model: Any) -> list[str]:
    """Every layer's :data:`DEFAULT_SUFFIXES` that the model has, in forward order."""
    wanted = {f"layers.{i}.{s}" for i in range(int(model.n_layers)) for s in DEFAULT_SUFFIXES}
    return [p.name for p in model.probe_points() if p.name in wanted]


def _resolution(model: Any, points: Sequence[str]) -> dict[str, str]:
    """point -> ``"head"``/``"unit"``/``"position"``: what the scores keep besides position."""
    shapes = {p.name: p.shape for p in model.probe_points()}
    kinds: dict[str, str] = {}
    for point in points:
        shape = shapes.get(point)
        if point.startswith("dict:") and point.endswith(":features"):
            kinds[point] = "unit"
        elif shape is not None and len(shape) == 4 and shape[1] == "seq":
            kinds[point] = "head"
        elif shape is not None and (len(shape) < 3 or shape[:2] != ("batch", "seq")):
            raise UsageError(f"attribution needs (batch, seq, ...) activations; {point!r} has"
                             f" shape {shape}")
        else:
            kinds[point] = "position"
    return kinds


@dataclass(frozen=True)
class AttributionResult:
    """Attribution scores per point: ``result[point]`` is ``(seq,)``, ``(seq, heads)`` at a
    per-head point or ``(seq, features)`` at a dictionary's features point — the estimated
    change of the mean metric when the corrupted activation replaces the clean one there.
    ``clean``/``corrupted`` are the measured mean metrics of the two runs."""

    scores: dict[str, np.ndarray]
    clean: float
    corrupted: float
    tokens: list[str]

    @property
    def points(self) -> list[str]:
        return list(self.scores)

    def __getitem__(self, point: str) -> np.ndarray:
        try:
            return self.scores[point]
        except KeyError:
            raise UsageError(f"no attribution for {point!r}; scored points: "
                             f"{', '.join(self.scores)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.scores)

    def __len__(self) -> int:
        return len(self.scores)

    def per_position(self, point: str) -> np.ndarray:
        """``(seq,)``: the point's scores summed over heads or features."""
        values = self[point]
        return values if values.ndim == 1 else values.sum(-1)

    def to_numpy(self) -> np.ndarray:
        """``(n_points, seq)``: :meth:`per_position` of every point, in :attr:`points` order."""
        return np.stack([self.per_position(p) for p in self.scores])

    def _repr_html_(self) -> str:
        from cloche.experiments.html import grid

        values = self.to_numpy()
        columns = self.tokens if len(self.tokens) == values.shape[1] else range(values.shape[1])
        return grid(values, rows=self.points, columns=columns, row_label="point", fmt="{:+.3f}",
                    caption=f"attribution patching: estimated metric change per position"
                            f" (clean {self.clean:.3f}, corrupted {self.corrupted:.3f})")


@reports
def attribution_patching(model: Any, clean: Any, corrupted: Any, metric: Metric | None = None,
                         *, points: Sequence[str] | None = None, progress: Any = True
                         ) -> AttributionResult:
    """Estimate, for every position of every point, the metric change of patching the
    corrupted activation into the clean run: ``(corrupted - clean) · dmetric/dclean`` summed
    over the hidden dimension, batch mean. Two passes in all (clean forward + backward,
    corrupted forward). ``metric``: ``fn(logits, tokens) -> (batch,)`` as for patching (default:
    log-prob of the clean run's top next token at the last position). ``points``: names (TL
    aliases and ``dict:<name>:features`` too); default :func:`default_points`."""
    a, b = _pair(model, clean, corrupted)
    names = default_points(model) if points is None else [model.resolve(p) for p in points]
    if not names:
        raise UsageError("no points to score: pass points=[...]")
    kinds = _resolution(model, names)
    progress.expect(2, "pass")
    with scratch(model, "attribution") as name:
        forward: dict[str, Any] = dict.fromkeys(names, _keep_clean)
        forward["logits"] = _clean_metric_probe(metric)
        model.run(a, probes=forward, grad_probes=dict.fromkeys(names, _keep_grad),
                  backward=_objective(metric), save=name, return_logits=False)
        progress.step()
        probes: dict[str, Any] = {p: _attribute(kinds[p]) for p in names}
        probes["logits"] = _corrupted_metric_probe(metric)
        model.run(b, probes=probes, save=name, return_logits=False)
        progress.step()
        saved = model.save_context(name)
        scores = {p: saved.fetch(f"attribution:{p}")[0].double().numpy() for p in names}
        clean_metric = float(saved.fetch("clean")[0].mean())
        corrupted_metric = float(saved.fetch("corrupted")[0].mean())
    try:
        tokens = model.to_str_tokens(a[0])
    except UsageError:
        tokens = [f"<{int(t)}>" for t in a[0]]
    return AttributionResult(scores, clean_metric, corrupted_metric, tokens)
