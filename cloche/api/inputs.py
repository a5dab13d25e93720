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


def encode_inputs(inputs: Any, tokenizer: Any, *, padding_side: str = "right",
                  prepend_bos: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, seq)`` long tensors on the CPU.

    Accepts a string, a list of strings (padded on ``padding_side``), a 1-D or 2-D tensor of
    token ids, a list of token-id lists of equal length, or a dict with ``input_ids`` (and
    optionally ``attention_mask``). ``tokenizer`` is only used for text.

    ``prepend_bos`` (text only): ``None`` tokenizes as the tokenizer does by itself (Llama's
    adds a BOS token, GPT-2's does not); ``True`` makes every row start with the BOS token;
    ``False`` adds no special token. Token ids are always used as given.
    """
    if padding_side not in ("right", "left"):
        raise UsageError(f"padding_side is 'right' or 'left', not {padding_side!r}")
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
        if prepend_bos is not None:
            return _encode_explicitly(texts, tokenizer, padding_side, prepend_bos)
        previous = tokenizer.padding_side
        tokenizer.padding_side = padding_side
        try:
            enc = tokenizer(texts, return_tensors="pt", padding=len(texts) > 1)
        finally:
            tokenizer.padding_side = previous
        return enc["input_ids"].long(), enc["attention_mask"].long()
    ids = _as_ids(inputs)
    return ids, torch.ones_like(ids)


def _encode_explicitly(texts: list[str], tokenizer: Any, padding_side: str, prepend_bos: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts without the tokenizer's own special tokens, then a BOS token if asked, padded."""
    rows = [list(r) for r in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    if prepend_bos:
        bos = tokenizer.bos_token_id
        if bos is None:
            raise UsageError("prepend_bos=True, but this model's tokenizer has no BOS token")
        rows = [[bos, *r] for r in rows]
    if any(not r for r in rows):
        raise UsageError("a text gave no tokens")
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    pad = pad if pad is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


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
