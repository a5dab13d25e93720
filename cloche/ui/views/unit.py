"""The unit page: one unit (or direction) of one probe point over a dataset.

One dataset pass with reducers, next to the data, finds the range, the moments, the density,
the per-example top activations (:class:`cloche.TopK`) and per-batch sums that give the
Pearson correlation with every other unit of the point; it also keeps the unit's value at every
token there (4 bytes a token). Knowing the range, one ``model.call`` feeds those values to a
:class:`cloche.Histogram` and to a TopK over hashed keys that samples tokens uniformly from
equal-width bins of the range (keys depend on example id and position only, so the sample does
not depend on batching or sharding). Datasets too large to keep the values get a second pass
with the same reducers instead. Then one ``model.call`` runs only the chosen examples to read
every token's activation around each peak, and the unembedding gives the unit's direct effect
on the logits. The choices follow ``cloche.experiments.top_examples`` (``skip_first``, one
entry per example), so its results and this page agree.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

import cloche
from cloche.errors import UsageError
from cloche.ui.views._units import Unit, check_unit, point_width
from cloche.ui.views.features import decoder_direction, dictionary_of

__all__ = ["direct_effect", "token_activations", "unit_page"]

Progress = Callable[[dict[str, Any]], None]

SAVED_TOKENS = 16 * 1024 * 1024  # 64 MiB of float32 values next to the data, at most


def _first_pass(index: int | None, direction: torch.Tensor | None, k: int, skip_first: int,
                correlate: bool, keep_values: bool) -> Any:
    def first_pass(ctx: Any, x: torch.Tensor) -> None:
        from cloche import Mean, MinMax, TopK, Variance
        from cloche.ui.views._units import unit_values

        v = unit_values(x, index, direction)  # (batch, seq)
        mask = ctx.attention_mask
        real = (torch.ones_like(v, dtype=torch.bool) if mask is None
                else mask.bool().to(v.device))
        ctx.reduce("range", v[..., None], MinMax())
        ctx.reduce("moments", v[..., None], Variance())
        ctx.reduce("positive", (v > 0).double()[..., None], Mean())
        best = v.clone()
        best[~real] = float("-inf")
        best[:, :skip_first] = float("-inf")
        keep = torch.zeros_like(best, dtype=torch.bool)
        keep.scatter_(1, best.argmax(dim=1, keepdim=True), True)
        best[~keep] = float("-inf")
        ctx.reduce("top", best[..., None], TopK(k))
        if correlate:  # per-batch sums (one matmul each), averaged over batches by Mean
            flat = x.flatten(2).double()
            weight = real.double()
            sums = torch.cat([torch.einsum("bs,bsd->d", v * weight, flat),
                              torch.einsum("bs,bsd->d", weight, flat),
                              torch.einsum("bs,bsd->d", weight, flat * flat),
                              weight.sum()[None]])
            ctx.reduce("corr", sums[None], Mean())
        if keep_values and ctx.example_ids is not None:  # the second look needs no forward
            ctx.save("values", v.float())
            ctx.save("real", real)
            ctx.save("ids", ctx.example_ids)

    return first_pass


def _histogram_and_samples(m: Any, name: str, edges: torch.Tensor, bins: int, per_bin: int,
                           seed: int) -> dict[str, Any]:
    """Runs next to the model: the histogram and the per-bin samples, with the same reducers
    as the second pass, fed from the values the first pass saved."""

    from cloche import Histogram, TopK
    from cloche.ui.views.unit import _bin_keys

    handle = m.save_context(name)
    hist = Histogram(bins, float(edges[0]), float(edges[-1]), per_unit=False)
    sample = TopK(per_bin)
    for v, real, ids in zip(handle.fetch("values", "list"), handle.fetch("real", "list"),
                            handle.fetch("ids", "list"), strict=True):
        v, real = v.double(), real.bool()
        hist.update(v[..., None], mask=real)
        sample.update(_bin_keys(v, ids, edges, seed), example_ids=ids, mask=real)
    return {"hist": hist.result(), "sample": sample.result()}


def _bin_keys(v: torch.Tensor, ids: torch.Tensor, edges: torch.Tensor, seed: int
              ) -> torch.Tensor:
    """(batch, seq, n_bins): a token's sampling key in its own bin, -1 in the others."""
    from cloche.ui.views.unit import _sample_keys

    keys = _sample_keys(ids, v.shape[1], seed).double()
    e = edges.to(v.device)
    which = torch.bucketize(v.contiguous(), e[1:-1].contiguous(), right=True)
    onehot = which[..., None] == torch.arange(e.numel() - 1, device=v.device)
    return torch.where(onehot, keys[..., None], -1.0)


def _sample_keys(example_ids: torch.Tensor, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) pseudo-random keys in [0, 2**62) that depend on (example id, position)
    only (a splitmix64-style mix; int64 wrap-around is intended)."""
    ids = example_ids.to(torch.int64)[:, None]
    h = ids * 1_000_003 + torch.arange(seq, dtype=torch.int64, device=ids.device)[None]
    h = h + seed * 7_919 + 0x2545F4914F6CDD1D
    for mult in (-7046029254386353131, -4658895280553007687):
        h = (h ^ (h >> 31)) * mult
    return (h ^ (h >> 29)) & ((1 << 62) - 1)


def _second_pass(index: int | None, direction: torch.Tensor | None, edges: torch.Tensor,
                 bins: int, per_bin: int, seed: int) -> Any:
    low, high = float(edges[0]), float(edges[-1])

    def second_pass(ctx: Any, x: torch.Tensor) -> None:
        from cloche import Histogram, TopK
        from cloche.ui.views._units import unit_values
        from cloche.ui.views.unit import _bin_keys

        v = unit_values(x, index, direction)
        ctx.reduce("hist", v[..., None], Histogram(bins, low, high, per_unit=False))
        if ctx.example_ids is not None:
            ctx.reduce("sample", _bin_keys(v, ctx.example_ids, edges, seed), TopK(per_bin))

    return second_pass


def _windows(m: Any, dataset: Any, point: str, index: int | None, direction: Any,
             pairs: list[tuple[int, int]], before: int, after: int) -> list[dict[str, Any]]:
    """Runs next to the model: the chosen examples in one batch, the unit's value at every
    token, cut to windows around each (example id, position)."""
    import uuid

    import torch

    from cloche import data
    from cloche.ui.views._units import unit_values

    ds = data.get(dataset, m.tokenizer) if isinstance(dataset, str) else dataset
    ids = sorted({i for i, _ in pairs})
    rows = [ds[i] for i in ids]
    length = max(len(r) for r in rows)
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = r
        mask[b, :len(r)] = 1
    name = f"ui/windows/{uuid.uuid4().hex[:12]}"

    def keep(ctx: Any, x: torch.Tensor) -> None:
        ctx.save("v", unit_values(x, index, direction).float())

    try:
        m.run({"input_ids": tokens, "attention_mask": mask}, probes={point: keep}, save=name,
              return_logits=False)
        values = m.save_context(name).fetch("v")[0]
    finally:
        m.save_context(name).clear()
    row_of = {i: b for b, i in enumerate(ids)}
    out = []
    for i, p in pairs:
        b, n = row_of[i], len(rows[row_of[i]])
        start, stop = max(0, p - before), min(n, p + after + 1)
        window = rows[b][start:stop].tolist()
        try:
            strs = m.to_str_tokens(torch.tensor(window))
        except Exception:  # noqa: BLE001 - a model without a tokenizer shows ids
            strs = [f"<{t}>" for t in window]
        out.append({"example_id": i, "position": p, "peak": p - start, "tokens": strs,
                    "token_ids": window, "values": values[b, start:stop].tolist(),
                    "activation": float(values[b, p])})
    return out


def _scratch() -> str:
    return f"ui/unit/{uuid.uuid4().hex[:12]}"


def _staged(progress: Progress | None, stage: int, stages: int) -> Any:
    if progress is None:
        return None

    def report(event: dict[str, Any]) -> None:
        if event.get("type") == "progress" and event.get("total"):
            fraction = (stage + event["done"] / event["total"]) / stages
            progress({"stage": f"pass {stage + 1} of {stages}", "fraction": fraction,
                      "done": event["done"], "total": event["total"]})

    return report


def direct_effect(model: Any, point: str, unit: Unit, k: int = 10) -> dict[str, Any]:
    """Tokens the unit's output direction promotes and suppresses through the unembedding.

    Defined for MLP neurons and directions (through ``W_out``), ``attn.z`` dimensions and
    directions (through ``W_O``), units or directions of residual-width points, and dictionary
    features (their decoder direction, at the point the dictionary writes); elsewhere
    ``{"reason": ...}``.
    """
    summary = dictionary_of(model, point)
    if summary is not None:
        try:
            out_point, decoder = decoder_direction(model, summary, unit)
        except UsageError as exc:
            return {"reason": str(exc)}
        effect = direct_effect(model, out_point, Unit(direction=tuple(decoder.tolist())), k)
        return {**effect, "through": f"W_dec of {summary['name']!r} at {out_point}"}
    parts = point.split(".")
    d_model = int(model.d_model)
    vector: torch.Tensor | None = None
    direction = unit.tensor()
    if len(parts) == 4 and parts[2:] == ["mlp", "post"]:
        vector = (model.param(f"layers.{parts[1]}.mlp.W_out", index=unit.index)
                  if direction is None else
                  direction.double() @ model.param(f"layers.{parts[1]}.mlp.W_out").double())
    elif len(parts) == 4 and parts[2:] == ["attn", "z"]:
        d_head = int(model.d_head)
        w_o = f"layers.{parts[1]}.attn.W_O"  # (n_heads, d_head, d_model)
        if unit.index is not None:
            vector = model.param(w_o, index=(unit.index // d_head, unit.index % d_head))
        else:
            assert direction is not None
            vector = direction.double() @ model.param(w_o).double().flatten(0, 1)
    elif point_width(model, point) == d_model and (
            parts[-1].startswith("resid") or point in ("embed", "final_norm")
            or parts[-1] == "out"):
        vector = direction if unit.index is None else torch.nn.functional.one_hot(
            torch.tensor(unit.index), d_model).double()
    if vector is None:
        return {"reason": f"no direct path to the logits from {point}"}
    effect = cloche.experiments.logit_effect(model, vector.double(), k)
    return {"top": effect["top"], "bottom": effect["bottom"]}


def unit_page(model: Any, point: str, unit: Unit, dataset: str, *, limit: int | None = 512,
              k: int = 12, bins: int = 40, n_bins: int = 5, per_bin: int = 3,
              window: tuple[int, int] = (16, 4), skip_first: int = 4, correlated: int = 8,
              seed: int = 0, batch_size: int = 16, cancel: Any = None,
              progress: Progress | None = None) -> dict[str, Any]:
    """Everything the unit page shows, as plain data."""
    point = model.resolve(point)
    width = point_width(model, point)
    check_unit(unit, width, point)
    direction = unit.tensor()
    correlate = unit.index is not None and width <= 4096
    name = _scratch()
    # below this many tokens the first pass keeps the unit's values (4 bytes a token) next to
    # the data and the histogram and samples are read from them; above, a second pass
    keep_values = limit is not None and limit * 1024 <= SAVED_TOKENS
    stages = 1 if keep_values else 2
    try:
        out = model.run_dataset(dataset, probes={point: _first_pass(
            unit.index, direction, k, skip_first, correlate, keep_values)}, save=name,
            limit=limit, batch_size=batch_size, progress=_staged(progress, 0, stages),
            cancel=cancel)
        red = out["reducers"]
        if "range" not in red:
            raise UsageError(f"the dataset {dataset!r} has no tokens to read")
        lo, hi = float(red["range"]["min"][0]), float(red["range"]["max"][0])
        edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1, dtype=torch.float64)
        if keep_values:
            red2 = model.call(_histogram_and_samples, name, edges, bins, per_bin, seed)
        else:
            red2 = model.run_dataset(dataset, probes={point: _second_pass(
                unit.index, direction, edges, bins, per_bin, seed)}, save=name, limit=limit,
                batch_size=batch_size, progress=_staged(progress, 1, 2),
                cancel=cancel)["reducers"]
    finally:
        model.save_context(name).clear()
    top = red["top"]
    keep = np.isfinite(np.asarray(top["values"][:, 0]))
    top_pairs = list(zip(np.asarray(top["example_ids"])[keep, 0].tolist(),
                         np.asarray(top["positions"])[keep, 0].tolist(), strict=True))
    sample = red2["sample"]
    bin_pairs: list[list[tuple[int, int]]] = []
    for b in range(n_bins):
        chosen = np.asarray(sample["values"][:, b]) >= 0
        bin_pairs.append(list(zip(np.asarray(sample["example_ids"])[chosen, b].tolist(),
                                  np.asarray(sample["positions"])[chosen, b].tolist(),
                                  strict=True)))
    pairs = top_pairs + [p for row in bin_pairs for p in row]
    windows = model.call(_windows, dataset, point, unit.index, direction, pairs, *window) \
        if pairs else []
    top_windows, rest = windows[:len(top_pairs)], windows[len(top_pairs):]
    quantiles = []
    for b, row in enumerate(bin_pairs):
        chosen_windows, rest = rest[:len(row)], rest[len(row):]
        quantiles.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                          "examples": sorted(chosen_windows, key=lambda w: -w["activation"])})
    hist = red2["hist"]
    counts = np.asarray(hist["counts"], dtype=np.int64).reshape(-1).copy()
    counts[0] += int(hist["underflow"])
    counts[-1] += int(hist["overflow"])
    moments = red["moments"]
    page: dict[str, Any] = {
        "model": model.name, "point": point, "unit": unit.key, "index": unit.index,
        "dataset": dataset, "limit": limit, "width": width,
        "stats": {"count": int(moments["count"]), "mean": float(moments["mean"][0]),
                  "std": float(moments["std"][0]), "min": lo, "max": hi,
                  "density": float(red["positive"]["mean"][0])},
        "histogram": {"edges": np.asarray(hist["edges"]).tolist(), "counts": counts.tolist()},
        "top": top_windows, "quantiles": quantiles,
        "logits": direct_effect(model, point, unit),
        "correlated": _correlated(red, unit, correlated) if correlate else None,
        "choice": {"skip_first": skip_first, "per_example": True, "k": k},
        "dictionary": _dictionary_brief(model, point),
    }
    return page


def _dictionary_brief(model: Any, point: str) -> dict[str, Any] | None:
    """Name, point, size and architecture of the dictionary whose features ``point`` is."""
    summary = dictionary_of(model, point)
    if summary is None:
        return None
    return {k: summary.get(k) for k in ("name", "point", "out_point", "d_dict", "architecture",
                                        "k")}


def _correlated(red: dict[str, Any], unit: Unit, n: int) -> dict[str, Any]:
    """Pearson r of the unit with every unit of its point, from the running means."""
    sums = np.asarray(red["corr"]["mean"], dtype=np.float64) * float(red["corr"]["count"])
    width = (sums.shape[0] - 1) // 3
    means = sums[:-1] / sums[-1]
    exy, ex, exx = means[:width], means[width:2 * width], means[2 * width:]
    assert unit.index is not None
    mu, var = ex[unit.index], exx[unit.index] - ex[unit.index] ** 2
    cov = exy - mu * ex
    var_all = exx - ex ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = cov / np.sqrt(np.maximum(var, 0) * np.maximum(var_all, 0))
    r[unit.index] = np.nan
    order = np.argsort(-np.nan_to_num(r, nan=-np.inf), kind="stable")
    best = [(int(i), float(r[i])) for i in order[:n] if np.isfinite(r[i])]
    worst_order = np.argsort(np.nan_to_num(r, nan=np.inf), kind="stable")
    worst = [(int(i), float(r[i])) for i in worst_order[:n] if np.isfinite(r[i])]
    return {"positive": best, "negative": worst}


def token_activations(model: Any, point: str, unit: Unit, text: str) -> dict[str, Any]:
    """The unit's value on every token of a text the user typed."""
    if not text:
        raise UsageError("type some text")
    point = model.resolve(point)
    check_unit(unit, point_width(model, point), point)
    target = unit.index if unit.index is not None else np.asarray(unit.direction,
                                                                   dtype=np.float32)
    values = cloche.experiments.unit_activations(model, point, target, text)
    return {"tokens": values.tokens[0], "values": values.values[0, :len(values.tokens[0]), 0]
            .astype(float).tolist()}
