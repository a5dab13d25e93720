"""Dictionary features on the unit page: which dictionary a point belongs to, and a feature's
decoder direction (its row of ``W_dec``) read through the public API.

The decoder direction is measured, not fetched: one small run replaces the features with zeros
(row 0) and with the unit (row 1) and reads ``dict:<name>:reconstruction``; the difference is
``W_dec[i]`` (or ``direction @ W_dec``) in the units of the point the dictionary writes, for
every normalisation that does not depend on the input (``none``, a stored scaling factor).
It works the same on a local, remote or sharded model, wherever the dictionary lives.
"""

from __future__ import annotations

import uuid
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.ui.views._units import Unit

__all__ = ["INPUT_DEPENDENT", "decoder_direction", "dictionary_of"]

#: normalisations whose decoder depends on the input: no single direction to show
INPUT_DEPENDENT = ("constant_norm_rescale", "layer_norm")


def dictionary_of(model: Any, point: str) -> dict[str, Any] | None:
    """The summary of the dictionary whose features ``point`` is (None for other points)."""
    parts = point.split(":")
    if len(parts) != 3 or parts[0] != "dict" or parts[2] != "features":
        return None
    summary = model.dictionaries().get(parts[1])
    if summary is None:
        raise UsageError(f"no dictionary named {parts[1]!r} is attached")
    return {"name": parts[1], **summary}


def _one_hot_features(index: int | None, direction: torch.Tensor | None) -> Any:
    def probe(ctx: Any, f: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(f)
        if direction is not None:
            out[1] = direction.to(f)
        else:
            out[1, :, index] = 1
        return out

    return probe


def decoder_direction(model: Any, summary: dict[str, Any], unit: Unit
                      ) -> tuple[str, torch.Tensor]:
    """(the point the dictionary writes, the feature's decoder direction there, float64)."""
    if summary.get("normalize_activations") in INPUT_DEPENDENT:
        raise UsageError(f"dictionary {summary['name']!r} normalises with"
                         f" {summary['normalize_activations']!r}: its decoder direction"
                         " depends on the input")
    name = f"ui/decoder/{uuid.uuid4().hex[:12]}"
    features, recon = f"dict:{summary['name']}:features", \
        f"dict:{summary['name']}:reconstruction"
    tokens = torch.zeros(2, 1, dtype=torch.long)

    def keep(ctx: Any, x: torch.Tensor) -> None:
        ctx.save("r", x[:, 0].double())

    try:
        model.run(tokens, probes={features: _one_hot_features(unit.index, unit.tensor()),
                                  recon: keep}, save=name, return_logits=False)
        r = model.save_context(name).fetch("r")[0]
    finally:
        model.save_context(name).clear()
    return str(summary.get("out_point") or summary["point"]), (r[1] - r[0]).flatten()
