"""Skip the unembedding when nobody needs the logits.

A reduction over a dataset, a patching sweep or an activation capture asks for no logits and
no loss, yet a plain Hugging Face forward still multiplies every position by the unembedding
matrix: on small models that is the single largest matmul of the pass. transformers' causal-LM
heads take ``logits_to_keep`` (keep the last N positions); asking for one position makes the
head's cost negligible without touching the blocks, the final norm or any probe point but
``logits`` itself.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

__all__ = ["head_kwargs"]

_ACCEPTS: dict[type, bool] = {}


def head_kwargs(hf_model: nn.Module, *, needed: bool) -> dict[str, Any]:
    """Extra forward kwargs for ``hf_model``: ``{"logits_to_keep": 1}`` when the logits are not
    ``needed`` and the model's forward accepts it, else nothing (the full, ordinary pass)."""
    if needed:
        return {}
    cls = type(hf_model)
    accepts = _ACCEPTS.get(cls)
    if accepts is None:
        try:
            accepts = "logits_to_keep" in inspect.signature(hf_model.forward).parameters
        except (TypeError, ValueError):
            accepts = False
        _ACCEPTS[cls] = accepts
    return {"logits_to_keep": 1} if accepts else {}
