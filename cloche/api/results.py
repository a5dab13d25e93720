"""What the model API hands back: plain records, the same for local, sharded and remote models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cloche.api.inputs import next_token_loss

__all__ = ["GenerateResult", "Outputs", "RunResult", "generate_result"]


@dataclass
class RunResult:
    """What ``run`` returns: logits (detached), the mean next-token loss, the tokens.

    ``loss`` is computed on first access from the logits when the run did not need it (a
    cross-entropy over the whole vocabulary is not free, and most probing runs never look).
    """

    logits: torch.Tensor | None
    loss_value: float | None
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    causal: bool = True

    @property
    def loss(self) -> float | None:
        if self.loss_value is None and self.causal and self.logits is not None:
            value = next_token_loss(self.logits, self.tokens, self.attention_mask)
            self.loss_value = None if value is None else float(value)
        return self.loss_value

    def __repr__(self) -> str:
        shape = None if self.logits is None else tuple(self.logits.shape)
        return f"RunResult(logits={shape}, loss={self.loss}, tokens={tuple(self.tokens.shape)})"


class Outputs:
    """What a ``backward=`` callable receives: live tensors that still carry the graph.

    ``loss`` (the next-token loss; None for a non-causal model or a single token) is computed
    on first access: a backward function that reads only ``logits`` pays no cross-entropy over
    the vocabulary. ``loss`` may be given as a tensor, None, or a function that computes it.
    """

    __slots__ = ("_loss", "attention_mask", "logits", "tokens")

    def __init__(self, logits: torch.Tensor, loss: Any, tokens: torch.Tensor,
                 attention_mask: torch.Tensor) -> None:
        self.logits = logits
        self._loss = loss
        self.tokens = tokens
        self.attention_mask = attention_mask

    @property
    def loss(self) -> torch.Tensor | None:
        if callable(self._loss):
            self._loss = self._loss()
        return self._loss

    def computed_loss(self) -> torch.Tensor | None:
        """The loss if something has computed it already, else None (computes nothing)."""
        return None if callable(self._loss) else self._loss

    def __repr__(self) -> str:
        return (f"Outputs(logits={tuple(self.logits.shape)}, tokens={tuple(self.tokens.shape)},"
                f" loss={'(not computed)' if callable(self._loss) else self._loss})")


@dataclass
class GenerateResult:
    """What ``generate`` returns: the tokens (prompt included) and, with a tokenizer, the text.

    One prompt gives one string and 1-d ``tokens``; a batch of prompts gives a list of strings
    (one per prompt, padding left out) and 2-d ``tokens``.
    """

    text: str | list[str] | None
    new_text: str | list[str] | None
    tokens: torch.Tensor


def generate_result(tokenizer: Any, out: torch.Tensor, prompt_len: int) -> GenerateResult:
    """Token ids from ``generate`` (prompt + continuation) as a :class:`GenerateResult`."""
    tokens = out[0].cpu() if out.shape[0] == 1 else out.cpu()
    new = tokens[..., prompt_len:]
    text: str | list[str] | None = None
    new_text: str | list[str] | None = None
    if tokenizer is not None and tokens.dim() == 1:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        new_text = tokenizer.decode(new, skip_special_tokens=True)
    elif tokenizer is not None:
        text = tokenizer.batch_decode(tokens, skip_special_tokens=True)
        new_text = tokenizer.batch_decode(new, skip_special_tokens=True)
    return GenerateResult(text, new_text, tokens)
