"""Dataset example collection: the contexts that most activate a unit or a direction.

The search runs next to the data: a probe feeds the unit's values to a :class:`cloche.TopK`
reducer inside ``run_dataset``, so only k (value, example id, position) triples cross the
network; then one ``model.call`` cuts the token windows around them and decodes them there.
Ties are broken as the reducer breaks them (lower example id, then lower position first), so
the result is the same however the data was batched or sharded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import UnitSpec, reports, scratch, select_units, unit_spec

__all__ = ["Example", "Examples", "contexts", "mark_peak", "quantile_examples", "top_activations",
           "top_examples"]

PEAK_OPEN, PEAK_CLOSE = "\u00ab", "\u00bb"  # « and »: mark the peak token in a context


@dataclass(frozen=True)
class Example:
    """One activating context: where it is, how strongly the unit fired, the tokens around it.

    ``tokens`` is the window of decoded tokens, ``peak`` the index of the activating token in
    it, ``context`` the window as one string with the peak token marked «like this».
    """

    example_id: int
    position: int
    activation: float
    tokens: list[str]
    token_ids: list[int]
    peak: int
    context: str = field(default="")

    def __post_init__(self) -> None:
        if not self.context:
            object.__setattr__(self, "context", mark_peak(self.tokens, self.peak))

    def __str__(self) -> str:
        return f"[{self.activation:+.3f}] #{self.example_id}@{self.position}: {self.context!r}"


def mark_peak(tokens: list[str], peak: int) -> str:
    """Join tokens into text with the token at ``peak`` wrapped in « »."""
    return "".join(f"{PEAK_OPEN}{t}{PEAK_CLOSE}" if i == peak else t for i, t in enumerate(tokens))


def _single_unit(unit: Any) -> UnitSpec:
    spec = unit_spec(unit)
    if spec[0] == "all" or (spec[0] == "index" and spec[1].numel() != 1) or (
            spec[0] == "direction" and spec[1].shape[0] != 1):
        raise UsageError("top_examples takes one unit (an int) or one direction (a (d,) vector)")
    return spec


def _topk_probe(spec: UnitSpec, k: int, largest: bool, name: str, skip_first: int = 0,
                per_example: bool = False) -> Any:
    worst = float("-inf") if largest else float("inf")

    def topk_probe(ctx: Any, x: torch.Tensor) -> None:
        from cloche import TopK

        values = select_units(x, spec)
        if skip_first or per_example:
            values = values.clone()
        if skip_first:
            values[:, :skip_first] = worst
        if per_example:  # only each row's best position competes: one entry per example
            mask = getattr(ctx, "attention_mask", None)
            if mask is not None:
                values[~mask.bool().to(values.device)] = worst
            best = values.argmax(dim=1) if largest else values.argmin(dim=1)
            keep = torch.zeros_like(values, dtype=torch.bool)
            keep.scatter_(1, best.unsqueeze(1), True)
            values[~keep] = worst
        ctx.reduce(name, values, TopK(k, largest=largest))

    return topk_probe


class Examples(list):
    """The examples :func:`top_examples` found, best first, and how they were chosen.

    ``skip_first``: positions left out at the start of every example; ``per_example``: at most
    one entry (the best position) per example.
    """

    def __init__(self, items: list[Example], *, point: str, unit: Any, skip_first: int,
                 per_example: bool, largest: bool) -> None:
        super().__init__(items)
        self.point, self.unit = point, unit
        self.skip_first, self.per_example, self.largest = skip_first, per_example, largest

    def describe(self) -> str:
        """How the examples were chosen, in one line (printed above them by ``str``)."""
        unit = self.unit if isinstance(self.unit, int) else "a direction"
        how = [f"first {self.skip_first} position(s) of each example skipped"
               if self.skip_first else "every position"]
        how.append("one entry per example" if self.per_example else "several per example allowed")
        return (f"{'top' if self.largest else 'bottom'} {len(self)} examples of {unit} at"
                f" {self.point} ({'; '.join(how)})")

    def __str__(self) -> str:
        return "\n".join([self.describe(), *(str(e) for e in self)])

    def _repr_html_(self) -> str:
        from cloche.experiments.html import marked_context, table

        rows = [(f"{e.activation:+.3f}", f"#{e.example_id}@{e.position}",
                 marked_context(e.tokens, e.peak)) for e in self]
        return table(["activation", "where", "context"], rows, caption=self.describe(),
                     raw_columns=(2,))


@reports
def top_examples(model: Any, point: str, unit: Any, dataset: Any, k: int = 10, *,
                 largest: bool = True, window: tuple[int, int] = (12, 4), batch_size: int = 8,
                 limit: int | None = None, progress: Any = True, skip_first: int = 4,
                 per_example: bool = True) -> Examples:
    """The ``k`` contexts of ``dataset`` where ``unit`` at ``point`` is largest (or smallest).

    ``unit`` is a unit index (flattened over the point's trailing dims) or a direction vector.
    ``dataset`` is a ``cloche.data.Dataset``, a dataset name or a list of strings. ``window``
    is how many tokens to show before and after the peak token.

    Defaults a researcher would pick: ``skip_first=4`` leaves out the first positions of every
    example (a chunk's first tokens have no context, and many units fire there on that alone),
    and ``per_example=True`` keeps one entry per example, its best position (otherwise one
    example can fill the list at neighbouring positions). Pass ``skip_first=0,
    per_example=False`` for the raw top k over every (example, position). The result says how
    it was chosen (``str(result)``, ``result.describe()``). ``progress``: a bar over the
    dataset's examples once it takes a second (``False``: none; a callable: the events).
    """
    if not isinstance(k, int) or k < 1:
        raise UsageError(f"k must be a positive int, not {k!r}")
    spec = _single_unit(unit)
    point = model.resolve(point)
    with scratch(model, "topk") as ctx_name:
        probe = _topk_probe(spec, k, largest, "top", skip_first, per_example)
        out = model.run_dataset(dataset, probes={point: probe}, save=ctx_name,
                                batch_size=batch_size, limit=limit, progress=progress)
    def chosen(items: list[Example]) -> Examples:
        return Examples(items, point=point, unit=unit if isinstance(unit, int) else None,
                        skip_first=skip_first, per_example=per_example, largest=largest)

    if "top" not in out["reducers"]:
        return chosen([])
    top = out["reducers"]["top"]
    keep = torch.as_tensor(top["values"][:, 0]).isfinite()  # short examples: skipped slots
    ids = [int(i) for i in top["example_ids"][keep, 0]]
    positions = [int(p) for p in top["positions"][keep, 0]]
    values = [float(v) for v in top["values"][keep, 0]]
    windows = contexts(model, dataset, ids, positions, window)
    return chosen([Example(i, p, v, w["tokens"], w["token_ids"], w["peak"])
                   for i, p, v, w in zip(ids, positions, values, windows, strict=True)])


@reports
def top_activations(model: Any, point: str, dataset: Any, k: int = 10, *, units: Any = None,
                    largest: bool = True, batch_size: int = 8, limit: int | None = None,
                    progress: Any = True) -> dict[str, np.ndarray]:
    """Top-k for many units in one dataset pass (e.g. every neuron of a layer, for neuron
    pages): ``{"values", "example_ids", "positions"}``, each (k, n_units), best first, plus
    ``units``. Windows for any of them come from :func:`contexts`."""
    spec = unit_spec(units)
    point = model.resolve(point)
    with scratch(model, "topk") as ctx_name:
        out = model.run_dataset(dataset, probes={point: _topk_probe(spec, k, largest, "top")},
                                save=ctx_name, batch_size=batch_size, limit=limit,
                                progress=progress)
    top = out["reducers"]["top"]
    result = {key: np.asarray(top[key]) for key in ("values", "example_ids", "positions")}
    n = result["values"].shape[1]
    result["units"] = np.arange(n) if spec[0] == "all" else (
        np.asarray(spec[1]) if spec[0] == "index" else np.arange(n))
    return result


@reports
def contexts(model: Any, dataset: Any, example_ids: list[int], positions: list[int],
             window: tuple[int, int] = (12, 4), *, progress: Any = True
             ) -> list[dict[str, Any]]:
    """Token windows around (example id, position) pairs, cut and decoded on the server.

    Each is ``{"tokens": [str], "token_ids": [int], "peak": int}``.
    """
    from cloche import data

    before, after = window
    if isinstance(dataset, data.Dataset):  # the client holds the tokens: ship only windows
        cut = [_cut(dataset[i], p, before, after)
               for i, p in zip(example_ids, positions, strict=True)]
        decoded = model.call(_decode_windows, [c[0] for c in cut])
        return [{"tokens": t, "token_ids": c[0], "peak": c[1]}
                for t, c in zip(decoded, cut, strict=True)]
    return model.call(_server_contexts, dataset, list(example_ids), list(positions), before, after)


def _cut(row: torch.Tensor, position: int, before: int, after: int) -> tuple[list[int], int]:
    start = max(0, position - before)
    stop = min(len(row), position + after + 1)
    return [int(t) for t in row[start:stop]], position - start


def _decode_windows(m: Any, windows: list[list[int]]) -> list[list[str]]:
    """Runs on the server: decode each window token by token."""
    from cloche.experiments._common import str_tokens

    return [str_tokens(m, w) for w in windows]


def _server_contexts(m: Any, dataset: Any, example_ids: list[int], positions: list[int],
                     before: int, after: int) -> list[dict[str, Any]]:
    """Runs on the server: rebuild the dataset as ``run_dataset`` did, cut and decode windows."""
    from cloche.experiments._common import server_dataset, str_tokens
    from cloche.experiments.examples import _cut

    ds = server_dataset(m, dataset)
    out = []
    for i, p in zip(example_ids, positions, strict=True):
        ids, peak = _cut(ds[i], p, before, after)
        out.append({"tokens": str_tokens(m, ids), "token_ids": ids, "peak": peak})
    return out


def _bin_probe(spec: UnitSpec, edges: torch.Tensor, k: int, seed: int, name: str) -> Any:
    def bin_probe(ctx: Any, x: torch.Tensor) -> None:
        from cloche import TopK
        from cloche.experiments._common import sample_keys

        v = select_units(x, spec)[..., 0].double()  # (batch, seq)
        keys = sample_keys(ctx.example_ids, v.shape[1], seed).double()
        e = edges.to(v.device)
        which = torch.bucketize(v, e[1:-1], right=True)  # bin index 0 .. n_bins-1
        n_bins = e.numel() - 1
        onehot = which[..., None] == torch.arange(n_bins, device=v.device)
        ctx.reduce(name, torch.where(onehot, keys[..., None], -1.0), TopK(k))

    return bin_probe


@reports
def quantile_examples(model: Any, point: str, unit: Any, dataset: Any, *, n_bins: int = 5,
                      k: int = 4, window: tuple[int, int] = (12, 4), seed: int = 0,
                      batch_size: int = 8, limit: int | None = None, progress: Any = True
                      ) -> list[list[Example]]:
    """Examples sampled across the whole range of ``unit``: ``n_bins`` equal-width bins between
    its minimum and maximum, up to ``k`` uniformly sampled contexts from each (lowest bin first).

    Two dataset passes on the server (range, then sampling with keys that depend only on
    example id and position, so the sample does not depend on batching); the activations of the
    sampled tokens are then read by running just those examples.
    """
    from cloche import MinMax

    spec = _single_unit(unit)
    point = model.resolve(point)
    progress.expect(2, "pass")
    with scratch(model, "quantiles") as ctx_name:
        def range_probe(ctx: Any, x: torch.Tensor) -> None:
            ctx.reduce("range", select_units(x, spec), MinMax())

        out = model.run_dataset(dataset, probes={point: range_probe}, save=ctx_name,
                                batch_size=batch_size, limit=limit, progress=progress)
        progress.step()
        extent = out["reducers"]["range"]
        lo, hi = float(extent["min"][0]), float(extent["max"][0])
        edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, n_bins + 1, dtype=torch.float64)
        out = model.run_dataset(dataset, probes={point: _bin_probe(spec, edges, k, seed, "bins")},
                                save=ctx_name, batch_size=batch_size, limit=limit,
                                progress=progress)
        progress.step()
    picked = out["reducers"]["bins"]
    bins: list[list[tuple[int, int]]] = []
    for b in range(n_bins):
        keep = picked["values"][:, b] >= 0
        bins.append(list(zip(picked["example_ids"][keep, b].tolist(),
                             picked["positions"][keep, b].tolist(), strict=True)))
    flat = [pair for row in bins for pair in row]
    if not flat:
        return [[] for _ in bins]
    acts = model.call(_activations_at, dataset, point, spec, flat)
    windows = contexts(model, dataset, [i for i, _ in flat], [p for _, p in flat], window)
    result, n = [], 0
    for row in bins:
        examples = []
        for i, p in row:
            w = windows[n]
            examples.append(Example(i, p, acts[n], w["tokens"], w["token_ids"], w["peak"]))
            n += 1
        result.append(sorted(examples, key=lambda e: -e.activation))
    return result


def _activations_at(m: Any, dataset: Any, point: str, spec: UnitSpec,
                    pairs: list[tuple[int, int]]) -> list[float]:
    """Runs on the server: the unit's value at each (example id, position)."""
    from cloche.experiments._common import scratch, select_units, server_dataset

    ds = server_dataset(m, dataset)
    values = []
    with scratch(m, "at") as name:
        for i, p in pairs:
            def read(c: Any, x: torch.Tensor, p: int = p) -> None:
                c.save("v", select_units(x, spec)[0, p, 0])

            m.run(ds[i], probes={point: read}, save=name, return_logits=False)
        values = [float(v) for v in m.save_context(name).fetch("v")]
    return values

