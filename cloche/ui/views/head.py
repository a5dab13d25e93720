"""The head page: one attention head's pattern on a text, its OV and QK circuits, and what
zero-ablating it costs.

The circuits come from ``cloche.experiments.ov_circuit`` / ``qk_circuit`` as factors
(d_vocab × d_head, d_head × d_vocab): the eigenvalues of the full d_vocab × d_vocab matrix that
are not zero are those of the small d_head × d_head product right @ left, and the top token
pairs are found a block of rows at a time, so the full matrix never exists at once. The
ablation uses ``cloche.experiments.ablate`` on held-out text and on repeated random tokens
(loss on the second copy, where induction heads matter).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

import cloche
from cloche.errors import UsageError

__all__ = ["head_ablation", "head_circuits", "head_pattern"]

DEFAULT_TEXT = ("def area(width, height):\n    return width * height\n\n"
                "def area(width, height):\n    return width * height\n")


def _check(model: Any, layer: int, head: int) -> None:
    if not 0 <= layer < int(model.n_layers) or not 0 <= head < int(model.n_heads):
        raise UsageError(f"no head L{layer}H{head}: the model has {model.n_layers} layers of"
                         f" {model.n_heads} heads")


def head_pattern(model: Any, layer: int, head: int, text: str) -> dict[str, Any]:
    _check(model, layer, head)
    text = text or DEFAULT_TEXT
    out = cloche.experiments.attention_patterns(model, text, layer, head)
    return {"text": text, "tokens": out["tokens"],
            "pattern": np.asarray(out["pattern"][0]).round(5).tolist()}


def _top_pairs(left: torch.Tensor, right: torch.Tensor, k: int, block: int = 512
               ) -> list[tuple[int, int, float]]:
    """The k largest entries of left @ right, (row, column, value), best first."""
    best_v = torch.empty(0, dtype=torch.float64)
    best_i = torch.empty(0, dtype=torch.long)
    n_cols = right.shape[1]
    for start in range(0, left.shape[0], block):
        chunk = (left[start:start + block] @ right).reshape(-1)
        v, i = chunk.topk(min(k, chunk.numel()))
        best_v = torch.cat([best_v, v])
        best_i = torch.cat([best_i, i + start * n_cols])
        keep = best_v.topk(min(k, best_v.numel()))
        best_v, best_i = keep.values, best_i[keep.indices]
    return [(int(i // n_cols), int(i % n_cols), float(v))
            for i, v in zip(best_i.tolist(), best_v.tolist(), strict=True)]


def _circuit(model: Any, kind: str, layer: int, head: int, k: int) -> dict[str, Any]:
    factored = (cloche.experiments.ov_circuit if kind == "ov" else
                cloche.experiments.qk_circuit)(model, layer, head)
    left = torch.as_tensor(np.asarray(factored.left), dtype=torch.float64)
    right = torch.as_tensor(np.asarray(factored.right), dtype=torch.float64)
    eig = torch.linalg.eigvals(right @ left).numpy()
    magnitude = np.abs(eig).sum()
    special = [i for i in getattr(model.tokenizer, "all_special_ids", []) or []
               if 0 <= i < left.shape[0]]
    if special:  # padding and end-of-text rows are not what a reader looks for
        left, right = left.clone(), right.clone()
        left[special] = 0.0
        right[:, special] = 0.0
    pairs = _top_pairs(left, right, k)
    rows = model.to_str_tokens([r for r, _, _ in pairs]) if pairs else []
    cols = model.to_str_tokens([c for _, c, _ in pairs]) if pairs else []
    return {"eigenvalues": [[float(e.real), float(e.imag)] for e in eig],
            "positive_fraction": float(eig.real.sum() / magnitude) if magnitude else 0.0,
            "pairs": [{"source": a, "target": b, "value": v}
                      for a, b, (_, _, v) in zip(rows, cols, pairs, strict=True)]}


def head_circuits(model: Any, layer: int, head: int, k: int = 12) -> dict[str, Any]:
    """Eigenvalues (and the share of their sum that is positive real: +1 for a head that
    copies) and the top token pairs of the OV (source → promoted) and QK (query → key)
    circuits."""
    _check(model, layer, head)
    return {"ov": _circuit(model, "ov", layer, head, k), "qk": _circuit(model, "qk", layer,
                                                                            head, k)}


def head_ablation(model: Any, layer: int, head: int, dataset: str, limit: int,
                  half: int = 32, progress: Any = None, cancel: Any = None) -> dict[str, Any]:
    """Loss with and without zeroing the head: held-out text, and the second copy of repeated
    random tokens. ``cancel`` (an event) stops the held-out passes where they run."""
    _check(model, layer, head)
    target = f"layers.{layer}.attn.head.{head}"
    heldout = cloche.experiments.ablate(model, target, dataset=dataset, limit=limit,
                                        progress=progress, cancel=cancel)
    tokens = cloche.experiments.repeated_tokens(model, half=half)
    repeated = cloche.experiments.ablate(model, target, tokens, loss_on=slice(half + 1, None))
    return {"heldout": {"clean": heldout.loss_clean, "ablated": heldout.loss_ablated,
                        "dataset": dataset, "limit": limit},
            "repeated": {"clean": repeated.loss_clean, "ablated": repeated.loss_ablated,
                         "half": half}}
