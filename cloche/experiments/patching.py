"""Activation patching: run corrupted prompts with one activation taken from the clean run.

The clean run's activations stay on the server: a probe keeps them in the scratch save
context's ``ctx.state`` and the patched runs' probes read them from there. A grid (every
layer × every position, or every layer × every head) costs one forward pass per layer: the
corrupted batch is tiled once per position (or head) and copy ``p`` is patched at ``p``. Only
the metric — one number per row, computed on the logits by a probe — comes back.

A metric is ``fn(logits, tokens) -> (batch,)`` tensor, run on the server (so keep it a small
self-contained function), e.g. :func:`logit_diff`. Clean and corrupted prompts must have the
same number of tokens; several pairs may be given as lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import as_tensor, reports, scratch

__all__ = ["GRID_KINDS", "PatchResult", "logit_diff", "patch", "patch_grid"]

GRID_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn.out", "mlp.out", "heads")

Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logit_diff(correct: Any, wrong: Any) -> Metric:
    """Metric: logit of ``correct`` minus logit of ``wrong`` at the last position, per row.

    Each is a token id or one token id per row.
    """
    good = torch.as_tensor(correct, dtype=torch.long).reshape(-1)
    bad = torch.as_tensor(wrong, dtype=torch.long).reshape(-1)

    def logit_diff_metric(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        last = logits[:, -1].float()
        n = last.shape[0]
        g = good.to(last.device).expand(n) if good.numel() == 1 else good.to(last.device)
        b = bad.to(last.device).expand(n) if bad.numel() == 1 else bad.to(last.device)
        rows = torch.arange(n, device=last.device)
        copies = n // g.numel()
        return last[rows, g.repeat(copies)] - last[rows, b.repeat(copies)]

    return logit_diff_metric


def _ids(model: Any, prompts: Any) -> torch.Tensor:
    if isinstance(prompts, str):
        return model.tokenize(prompts).reshape(1, -1)
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        rows = [model.tokenize(p).reshape(-1) for p in prompts]
        if len({len(r) for r in rows}) != 1:
            raise UsageError("patching needs prompts of equal token length, got lengths "
                             f"{[len(r) for r in rows]}; pass token ids to control this")
        return torch.stack(rows)
    ids = as_tensor(prompts).long()
    return ids[None] if ids.dim() == 1 else ids


def _pair(model: Any, clean: Any, corrupted: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _ids(model, clean), _ids(model, corrupted)
    if a.shape != b.shape:
        raise UsageError(f"clean {tuple(a.shape)} and corrupted {tuple(b.shape)} token ids must "
                         "have the same shape")
    return a, b


def _metric_probe(metric: Metric, key: str) -> Any:
    def metric_probe(ctx: Any, logits: torch.Tensor) -> None:
        ctx.save(key, metric(logits, ctx.tokens.to(logits.device)).detach().float().reshape(-1))

    return metric_probe


def _cache_probe(ctx: Any, x: torch.Tensor) -> None:
    ctx.state[f"clean:{ctx.point}"] = x.detach().clone()


def _clean_run(model: Any, ids: torch.Tensor, points: list[str], metric: Metric,
               name: str) -> float:
    probes: dict[str, Any] = dict.fromkeys(points, _cache_probe)
    probes["logits"] = _metric_probe(metric, "clean")
    model.run(ids, probes=probes, save=name, return_logits=False)
    return float(model.save_context(name).fetch("clean")[0].mean())


def _corrupted_run(model: Any, ids: torch.Tensor, points: list[str], metric: Metric,
                   name: str) -> float:
    probes: dict[str, Any] = dict.fromkeys(points, _noop)  # same code path as patched runs
    probes["logits"] = _metric_probe(metric, "corrupted")
    model.run(ids, probes=probes, save=name, return_logits=False)
    return float(model.save_context(name).fetch("corrupted")[0].mean())


def _noop(ctx: Any, x: torch.Tensor) -> None:
    return None


def _patch_probe(positions: Any, heads: Any) -> Any:
    def patch_probe(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        clean = ctx.state[f"clean:{ctx.point}"].to(x)
        y = x.clone()
        if heads is None and positions is None:
            return clean.clone()
        pos = slice(None) if positions is None else positions
        if heads is None:
            y[:, pos] = clean[:, pos]
        else:
            y[:, pos, heads] = clean[:, pos, heads]
        return y

    return patch_probe


@reports
def patch(model: Any, clean: Any, corrupted: Any, point: str, metric: Metric, *,
          positions: Any = None, heads: Any = None, progress: Any = True) -> float:
    """The mean metric over the corrupted prompts with ``point`` patched from the clean run.

    ``positions``: a position or list of positions (default all); ``heads``: for per-head
    points (``attn.z``/``q``/``k``/``v``), a head or list of heads (default all).
    """
    a, b = _pair(model, clean, corrupted)
    point = model.resolve(point)
    pos = None if positions is None else torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    hs = None if heads is None else torch.as_tensor(heads, dtype=torch.long).reshape(-1)
    with scratch(model, "patch") as name:
        _clean_run(model, a, [point], metric, name)
        model.run(b, probes={point: _patch_probe(pos, hs),
                             "logits": _metric_probe(metric, "patched")},
                  save=name, return_logits=False)
        return float(model.save_context(name).fetch("patched")[0].mean())


def _grid_probe(copies: int, batch: int, by_head: bool, positions: torch.Tensor) -> Any:
    def grid_probe(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        clean = ctx.state[f"clean:{ctx.point}"].to(x)
        y = x.clone().view(copies, batch, *x.shape[1:])
        for c in range(copies):
            if by_head:
                y[c, :, :, c] = clean[:, :, c]
            else:
                p = int(positions[c])
                y[c, :, p] = clean[:, p]
        return y.view(x.shape)

    return grid_probe


@dataclass(frozen=True)
class PatchResult:
    """``grid`` (n_layers, n_positions or n_heads) of the mean metric after each patch, with
    the unpatched ``clean`` and ``corrupted`` metrics; ``normalized`` maps corrupted to 0 and
    clean to 1."""

    kind: str
    grid: np.ndarray
    clean: float
    corrupted: float
    columns: list[Any]
    tokens: list[str]

    @property
    def normalized(self) -> np.ndarray:
        span = self.clean - self.corrupted
        return (self.grid - self.corrupted) / span if span else np.full_like(self.grid, np.nan)

    def _repr_html_(self) -> str:
        from cloche.experiments.html import grid

        columns = self.tokens if self.kind != "heads" and len(self.tokens) == len(
            self.columns) else self.columns
        return grid(self.normalized, rows=range(self.grid.shape[0]), columns=columns,
                    row_label="layer",
                    caption=f"patching {self.kind}: normalized metric (corrupted 0, clean 1;"
                            f" clean {self.clean:.3f}, corrupted {self.corrupted:.3f})")


@reports
def patch_grid(model: Any, clean: Any, corrupted: Any, metric: Metric, *,
               kind: str = "resid_pre", positions: Any = None, progress: Any = True
               ) -> PatchResult:
    """Patch ``kind`` (``resid_pre``/``resid_mid``/``resid_post``/``attn.out``/``mlp.out`` by
    layer × position, or ``heads`` — each head's ``attn.z`` at every position — by layer ×
    head) from the clean into the corrupted run, one cell at a time; one pass per layer.
    ``progress``: a bar over the passes (the clean and corrupted runs, then one per layer)."""
    if kind not in GRID_KINDS:
        raise UsageError(f"kind must be one of {GRID_KINDS}, not {kind!r}")
    a, b = _pair(model, clean, corrupted)
    n_layers, batch, seq = int(model.n_layers), int(b.shape[0]), int(b.shape[1])
    by_head = kind == "heads"
    if by_head:
        columns: list[Any] = list(range(int(model.n_heads)))
    else:
        columns = list(range(seq)) if positions is None else [int(p) % seq for p in positions]
    copies = len(columns)
    suffix = "attn.z" if by_head else kind
    points = [f"layers.{i}.{suffix}" for i in range(n_layers)]
    grid = np.zeros((n_layers, copies))
    pos = torch.as_tensor(columns, dtype=torch.long)
    progress.expect(n_layers + 2, "pass")
    with scratch(model, "patchgrid") as name:
        clean_metric = _clean_run(model, a, points, metric, name)
        corrupted_metric = _corrupted_run(model, b, points, metric, name)
        progress.step(2)
        tiled = b.repeat(copies, 1)
        for layer, point in enumerate(points):
            key = f"grid{layer}"
            model.run(tiled, probes={point: _grid_probe(copies, batch, by_head, pos),
                                     "logits": _metric_probe(metric, key)},
                      save=name, return_logits=False)
            values = model.save_context(name).fetch(key)[0].reshape(copies, batch)
            grid[layer] = values.double().mean(1).numpy()
            progress.step()
    try:
        tokens = model.to_str_tokens(b[0])
    except UsageError:
        tokens = [f"<{int(t)}>" for t in b[0]]
    return PatchResult(kind, grid, clean_metric, corrupted_metric, columns, tokens)
