"""The text view: per-token loss, the logit lens and every head's attention on one text."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import torch

import cloche
from cloche.errors import UsageError

__all__ = ["MAX_TEXT_TOKENS", "text_page"]

MAX_TEXT_TOKENS = 256  # attention for every head grows with its square


def text_page(model: Any, text: str, *, k: int = 5) -> dict[str, Any]:
    """Tokens, the loss of predicting each next token, the top-``k`` logit-lens tokens per
    layer and position, and the attention patterns of every head (layer by layer)."""
    if not text:
        raise UsageError("paste some text")
    ids = model.tokenize(text)
    if ids.numel() > MAX_TEXT_TOKENS:
        raise UsageError(f"the text has {ids.numel()} tokens; the text view takes at most"
                         f" {MAX_TEXT_TOKENS}")
    scratch = f"ui/text/{uuid.uuid4().hex[:12]}"  # the run leaves no trace in "default"
    try:
        out = model.run(ids, save=scratch)
    finally:
        model.save_context(scratch).clear()
    logprobs = torch.log_softmax(out.logits[0].double(), -1)
    loss = (-logprobs[:-1].gather(-1, ids[1:, None])[:, 0]).tolist()
    lens = cloche.experiments.logit_lens(model, ids, k=k)
    attention = [cloche.experiments.attention_patterns(model, ids, layer)["pattern"]
                 for layer in range(int(model.n_layers))]
    return {
        "model": model.name, "tokens": model.to_str_tokens(ids), "token_ids": ids.tolist(),
        "loss": loss, "mean_loss": float(np.mean(loss)) if loss else None,
        "lens": {"top_tokens": lens.top_tokens,
                 "logprobs": np.asarray(lens.logprobs).round(4).tolist(),
                 "target_logprob": np.asarray(lens.target_logprob).round(4).tolist()},
        "attention": [np.asarray(a).round(4).tolist() for a in attention],
    }
