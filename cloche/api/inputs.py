"""Turn what a user passes to ``run`` into token ids and an attention mask."""

from __future__ import annotations

from typing import Any

import torch

from cloche.errors import UsageError

__all__ = ["encode_inputs", "is_text", "next_token_loss"]


def is_text(inputs: Any) -> bool:
    """Whether ``inputs`` is text (a string or a non-empty list of strings), not token ids."""
    return isinstance(inputs, str) or (isinstance(inputs, (list, tuple)) and bool(inputs)
                                       and all(isinstance(t, str) for t in inputs))


def encode_inputs(inputs: Any, tokenizer: Any, *, padding_side: str = "right"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, seq)`` long tensors on the CPU.

    Accepts a string, a list of strings (padded on ``padding_side``), a 1-D or 2-D tensor of
    token ids, a list of token-id lists of equal length, or a dict with ``input_ids`` (and
    optionally ``attention_mask``). ``tokenizer`` is only used for text.
    """
    if isinstance(inputs, dict):
        if "input_ids" not in inputs:
            raise UsageError("a dict input needs an 'input_ids' entry")
        ids = _as_ids(inputs["input_ids"])
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else _as_ids(mask)
        if mask.shape != ids.shape:
            raise UsageError(f"attention_mask shape {tuple(mask.shape)} != input_ids"
                             f" {tuple(ids.shape)}")
        return ids, mask
    if is_text(inputs):
        if tokenizer is None:
            raise UsageError("this model has no tokenizer: pass token ids instead of text")
        texts = [inputs] if isinstance(inputs, str) else list(inputs)
        if any(t == "" for t in texts):
            raise UsageError("cannot run an empty string")
        previous = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
        finally:
            tokenizer.padding_side = previous
        return enc["input_ids"].long(), enc["attention_mask"].long()
    ids = _as_ids(inputs)
    return ids, torch.ones_like(ids)


def _as_ids(value: Any) -> torch.Tensor:
    try:
        ids = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"inputs must be text or token ids, not {type(value).__name__}") from exc
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise UsageError(f"token ids must be integers, not {ids.dtype}")
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise UsageError(f"token ids must be (seq,) or (batch, seq), got shape {tuple(ids.shape)}")
    return ids.long()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                    ) -> torch.Tensor | None:
    """Mean next-token cross-entropy over positions whose token and next token are both real."""
    if ids.shape[1] < 2:
        return None
    logits = logits[:, :-1].float()
    targets = ids[:, 1:].to(logits.device)
    valid = (mask[:, 1:] * mask[:, :-1]).to(logits.device).bool()
    if not valid.any():
        return None
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    )
    return losses[valid.reshape(-1)].mean()
