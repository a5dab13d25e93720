"""Single units: one neuron, one head dimension or one direction, on texts and over datasets.

A *unit* is an index into a point's trailing dimensions (flattened: unit ``h * d_head + j``
of ``attn.z`` is dimension j of head h), a list of them, or a direction (a float vector, the
activation is then the projection on it). :func:`activations` gives the token-level view of
given texts; :func:`stats` the summary statistics and histogram over a whole dataset, computed
with reducers on the server (two passes: range, then histogram over that range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import reports, scratch, select_units, to_numpy, unit_spec

__all__ = ["TokenValues", "UnitStats", "activations", "stats"]


@dataclass(frozen=True)
class TokenValues:
    """Per-token values of some units on some texts.

    ``values`` (batch, seq, n_units), ``tokens`` decoded tokens per row (padding left out),
    ``mask`` (batch, seq) 1 on real tokens.
    """

    values: np.ndarray
    tokens: list[list[str]]
    token_ids: np.ndarray
    mask: np.ndarray

    def rows(self, unit: int = 0) -> list[list[tuple[str, float]]]:
        """[(token, value), ...] per text, for unit column ``unit``."""
        return [[(t, float(self.values[b, i, unit])) for i, t in enumerate(toks)]
                for b, toks in enumerate(self.tokens)]


@reports
def activations(model: Any, point: str, unit: Any, inputs: Any, *, progress: Any = True
                ) -> TokenValues:
    """Values of ``unit`` at ``point`` for every token of ``inputs`` (text, texts or ids).
    ``progress``: as for ``model.run`` (a bar only when slow or queued; ``False``: none)."""
    spec = unit_spec(unit)
    point = model.resolve(point)

    def unit_probe(ctx: Any, x: torch.Tensor) -> None:
        ctx.save("values", select_units(x, spec).float())

    with scratch(model, "unit") as name:
        out = model.run(inputs, probes={point: unit_probe}, save=name, return_logits=False)
        values = model.save_context(name).fetch("values")[0]
    tokens = []
    for row, mask in zip(out.tokens, out.attention_mask, strict=True):
        ids = row[mask.bool()]
        try:
            tokens.append(model.to_str_tokens(ids))
        except UsageError:
            tokens.append([f"<{int(i)}>" for i in ids])
    return TokenValues(values.numpy(), tokens, out.tokens.numpy(), out.attention_mask.numpy())


@dataclass(frozen=True)
class UnitStats:
    """Summary of one unit over a dataset (every real token)."""

    count: int
    mean: float
    std: float
    min: float
    max: float
    counts: np.ndarray
    edges: np.ndarray

    @property
    def fraction_positive(self) -> float:
        centres = (self.edges[:-1] + self.edges[1:]) / 2
        return float(self.counts[centres > 0].sum() / max(self.counts.sum(), 1))


@reports
def stats(model: Any, point: str, unit: Any, dataset: Any, *, bins: int = 50,
          range: tuple[float, float] | None = None, batch_size: int = 8,
          limit: int | None = None, progress: Any = True) -> UnitStats:
    """Count, mean, std, min, max and a ``bins``-bin histogram of one unit over ``dataset``.

    Without ``range`` the histogram spans [min, max] (one extra pass to find them).
    ``progress``: a bar over the two passes (``False``: none; a callable: the events).
    """
    from cloche import Histogram, MinMax, Variance

    spec = unit_spec(unit)
    if spec[0] == "all" or len(spec[1]) != 1:
        raise UsageError("stats takes one unit (an int) or one direction")
    point = model.resolve(point)
    progress.expect(2, "pass")

    def moments_probe(ctx: Any, x: torch.Tensor) -> None:
        v = select_units(x, spec)
        ctx.reduce("var", v, Variance())
        ctx.reduce("range", v, MinMax())

    with scratch(model, "stats") as name:
        out = model.run_dataset(dataset, probes={point: moments_probe}, save=name,
                                batch_size=batch_size, limit=limit, progress=progress)
        progress.step()
        moments, extent = out["reducers"]["var"], out["reducers"]["range"]
        lo, hi = range if range is not None else (float(extent["min"][0]), float(extent["max"][0]))
        if not hi > lo:
            hi = lo + 1.0

        def histogram_probe(ctx: Any, x: torch.Tensor) -> None:
            ctx.reduce("hist", select_units(x, spec), Histogram(bins, lo, hi, per_unit=False))

        out = model.run_dataset(dataset, probes={point: histogram_probe}, save=name,
                                batch_size=batch_size, limit=limit, progress=progress)
        progress.step()
    hist = out["reducers"]["hist"]
    counts = to_numpy(hist["counts"]).copy()
    counts[0] += int(hist["underflow"])
    counts[-1] += int(hist["overflow"])
    return UnitStats(int(moments["count"]), float(moments["mean"][0]), float(moments["std"][0]),
                     float(extent["min"][0]), float(extent["max"][0]), counts,
                     to_numpy(hist["edges"]))
