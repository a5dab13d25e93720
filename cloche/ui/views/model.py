"""The model page: what the model is, its probe points, and its head-score grids."""

from __future__ import annotations

from typing import Any

import numpy as np

import cloche

__all__ = ["HEAD_SCORE_KINDS", "model_page"]

HEAD_SCORE_KINDS = ("previous_token", "induction", "duplicate_token")


def model_page(model: Any) -> dict[str, Any]:
    """Name, family and sizes; every probe point with its shape; the three head-score grids
    (``cloche.experiments.head_scores`` on repeated random tokens); attached dictionaries."""
    info = model.info()
    points = [{"name": p.name, "kind": p.kind, "layer": p.layer,
               "shape": None if p.shape is None else [s if isinstance(s, str) else int(s)
                                                         for s in p.shape]}
              for p in model.probe_points()]
    scores = {kind: np.asarray(cloche.experiments.head_scores(model, kind)).tolist()
              for kind in HEAD_SCORE_KINDS} if info.get("n_heads") else {}
    dictionaries = [{"name": name, **{k: d.get(k) for k in (
        "point", "out_point", "d_dict", "architecture", "k")}}
        for name, d in sorted(model.dictionaries().items())]
    return {"model": model.name, "info": info, "points": points, "head_scores": scores,
            "address": model.address, "dictionaries": dictionaries}
