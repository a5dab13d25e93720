"""Stand-ins for the modules a rank does not own, so the model's own ``forward()`` still runs.

Every rank calls the unmodified Hugging Face ``forward()``: transformers builds the masks,
position ids and rotary embeddings itself. Only the modules a rank does not hold are swapped:

- :class:`ZeroEmbedding` / :class:`ZeroHidden` — embeddings on ranks > 0 (their output is
  replaced by the received hidden state anyway, so zeros of the right shape are enough);
- :class:`PassBlock` — a block owned elsewhere, away from this rank's boundaries;
- :class:`ReceiveBlock` — the block just before this rank's first block: it returns the hidden
  state received from the previous rank (a leaf whose gradient is sent back after backward);
- :class:`SendBlock` — the block just after this rank's last block: it ships the hidden state on;
- :class:`Passthrough` / :class:`LogitsStub` — final norm and unembedding on ranks < last.

Blocks of a model with a KV cache also keep the cache's bookkeeping right: a stub appends a
one-element key/value for its layer, so ``cache.get_seq_length()`` and the masks built from it
agree with the ranks that hold the real layers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

__all__ = ["LogitsStub", "PassBlock", "Passthrough", "ReceiveBlock", "SendBlock",
           "ZeroEmbedding", "ZeroHidden"]


class Pipeline(Protocol):
    """What stubs ask of the rank's stage."""

    def receive_activation(self, like: torch.Tensor) -> torch.Tensor: ...

    def send_activation(self, hidden: torch.Tensor) -> None: ...

    def logits_for(self, hidden: torch.Tensor, vocab: int) -> torch.Tensor: ...


def _find_cache(args: tuple, kwargs: dict) -> Any:
    from transformers.cache_utils import Cache

    for key in ("cache", "past_key_values", "layer_past"):
        value = kwargs.get(key)
        if isinstance(value, Cache):
            return value
    for value in args:
        if isinstance(value, Cache):
            return value
    return None


def _touch_cache(layer: int, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
    cache = _find_cache(args, kwargs)
    if cache is None:
        return
    from transformers.cache_utils import EncoderDecoderCache

    if isinstance(cache, EncoderDecoderCache):
        cache = cache.self_attention_cache
    batch, seq = hidden.shape[0], hidden.shape[1]
    tiny = hidden.new_zeros(batch, 1, seq, 1)
    cache.update(tiny, tiny, layer)


class PassBlock(nn.Module):
    """A block owned by another rank: passes the hidden state through unchanged."""

    def __init__(self, layer: int, as_tuple: bool = False) -> None:
        super().__init__()
        self.layer = layer
        # blocks of some families return (hidden, attention weights) and the model reads [0]
        self.as_tuple = as_tuple

    def _out(self, hidden_states: torch.Tensor) -> Any:
        return (hidden_states, None) if self.as_tuple else hidden_states

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _touch_cache(self.layer, hidden_states, args, kwargs)
        return self._out(hidden_states)


class ReceiveBlock(PassBlock):
    """The block before this rank's first block: returns the previous rank's hidden state."""

    def __init__(self, layer: int, stage: Pipeline, as_tuple: bool = False) -> None:
        super().__init__(layer, as_tuple)
        self._stage = [stage]  # a list, so the stage is not registered as a submodule

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        _touch_cache(self.layer, hidden_states, args, kwargs)
        return self._out(self._stage[0].receive_activation(hidden_states))


class SendBlock(PassBlock):
    """The block after this rank's last block: ships the hidden state to the next rank."""

    def __init__(self, layer: int, stage: Pipeline, as_tuple: bool = False) -> None:
        super().__init__(layer, as_tuple)
        self._stage = [stage]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._stage[0].send_activation(hidden_states)
        _touch_cache(self.layer, hidden_states, args, kwargs)
        return self._out(hidden_states)


class ZeroEmbedding(nn.Module):
    """An embedding held by rank 0: zeros of the embedding's output shape."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def forward(self, ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


class ZeroHidden(nn.Module):
    """A composite embedding module held by rank 0 (e.g. BERT's): zeros (batch, seq, d)."""

    def __init__(self, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.dim = dim
        self.dtype = dtype

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = next(a for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor))
        return torch.zeros(ids.shape[0], ids.shape[1], self.dim, dtype=self.dtype,
                           device=ids.device)


class Passthrough(nn.Module):
    """A norm (or other shape-keeping module) held by the last rank."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class LogitsStub(nn.Module):
    """The unembedding on ranks < last: the stage decides what stands in for the logits."""

    def __init__(self, vocab: int, stage: Pipeline) -> None:
        super().__init__()
        self.vocab = vocab
        self._stage = [stage]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._stage[0].logits_for(hidden_states, self.vocab)
