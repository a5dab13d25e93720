"""A sharded model against the same model in one process: every canonical point, the logits
and the gradients must agree (the layer pipeline only moves tensors between ranks)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from cloche.check.battery import canonical_points, guarded
from cloche.check.compare import capture, compare
from cloche.check.report import FAIL, SKIP, Row

__all__ = ["sharded_rows"]


def _saver(ctx: Any, x: torch.Tensor) -> None:
    ctx.save(ctx.point, x)


def _grads(model: Any, ids: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    context = "cloche-check-grads"
    handle = model.save_context(context)
    handle.clear()
    model.run(ids, grad_probes=dict.fromkeys(names, _saver), backward=True, save=context)
    try:
        return {n: handle.fetch(n)[0] for n in names}
    finally:
        handle.clear()


def sharded_rows(local: Any, sharded: Any, ids: torch.Tensor) -> list[Row]:
    """Rows comparing ``sharded`` (a model over several ranks) with ``local`` (one process)."""
    world = sharded.world_size
    label = f"sharded ({world} ranks) == single process"

    def points() -> Iterator[Row]:
        names = canonical_points(local)
        theirs = canonical_points(sharded)
        if theirs != names:
            lost = sorted(set(names) - set(theirs))
            added = sorted(set(theirs) - set(names))
            yield Row(check=f"{label}: catalog", n_points=len(names), status=FAIL,
                      reason=f"points only on one process: {lost[:3]}; only sharded: {added[:3]}")
            return
        ranks = sorted({sharded.owner_of(n) for n in names})
        got, want = capture(sharded, ids, names), capture(local, ids, names)
        yield compare(f"{label}: every point", [(n, got[n], want[n]) for n in names],
                      points=f"all {len(names)} canonical points on ranks {ranks}")

    def logits() -> Iterator[Row]:
        if not local.info()["lm_head"]:
            yield Row(check=f"{label}: logits", status=SKIP,
                      reason="saved without a language-model head")
            return
        yield compare(f"{label}: logits", [("logits", sharded.run(ids).logits,
                                            local.run(ids).logits)], points="logits (no probes)")

    def gradients() -> Iterator[Row]:
        info = local.info()
        if not (info["causal"] and info["lm_head"]):
            yield Row(check=f"{label}: gradients", status=SKIP,
                      reason="no next-token loss (not a causal model with a head)")
            return
        points = set(canonical_points(local))
        names = [f"layers.{i}.{s}" for s in ("resid_pre", "resid_mid")
                 for i in range(local.n_layers) if f"layers.{i}.{s}" in points]
        got, want = _grads(sharded, ids, names), _grads(local, ids, names)
        yield compare(f"{label}: gradients", [(n, got[n], want[n]) for n in names],
                      atol=1e-6, rtol=1e-5)

    rows: list[Row] = []
    for step in (points, logits, gradients):
        rows.extend(guarded(f"{label}: {step.__name__}", step))
    return rows
