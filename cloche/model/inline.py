"""Attention for families that compute it inline, written out with probe taps.

Most families call transformers' AttentionInterface, which cloche taps without touching the
model (``model.attention``). A few compute attention inside their attention module's
``forward``; for those, a run that probes ``attn.q/k/v/pattern/z`` replaces that module's
``forward`` (an instance attribute, removed after the run) with the function here, which does
what the model's own code does, step for step, with a tap at each internal. Runs without
attention probes use the model's own code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["bloom_attention", "falcon_attention"]

Apply = Callable[[int, str, torch.Tensor], torch.Tensor]


def bloom_attention(module: Any, layer: int, apply: Apply, needs_pattern: Callable[[int], bool],
                    hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                    attention_mask: torch.Tensor | None, layer_past: Any = None,
                    use_cache: bool = False, output_attentions: bool = False, **kwargs: Any
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``BloomAttention.forward`` (transformers 5) with taps: ALiBi scores, softmax, mixing."""
    batch, q_length, _ = hidden_states.shape
    heads, d_head = module.num_heads, module.head_dim
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    query = apply(layer, "q", query.transpose(1, 2)).transpose(1, 2)
    key = apply(layer, "k", key.transpose(1, 2)).transpose(1, 2)
    value = apply(layer, "v", value.transpose(1, 2)).transpose(1, 2)
    query = query.reshape(batch * heads, -1, d_head)
    key = key.reshape(batch * heads, -1, d_head).transpose(-1, -2)
    value = value.reshape(batch * heads, -1, d_head)
    scores = alibi.baddbmm(batch1=query, batch2=key, beta=module.beta,
                           alpha=module.inv_norm_factor)
    weights = scores.view(batch, heads, q_length, -1)
    if attention_mask is not None:
        weights = weights + attention_mask
    probs = nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = module.attention_dropout(probs)
    if needs_pattern(layer):
        probs = apply(layer, "pattern", probs)
    context = torch.bmm(probs.reshape(batch * heads, q_length, -1), value)
    z = apply(layer, "z", context.view(batch, heads, q_length, d_head).transpose(1, 2))
    context = z.reshape(batch, q_length, heads * d_head)
    if module.pretraining_tp > 1 and module.slow_but_exact:
        width = module.hidden_size / module.pretraining_tp
        output = torch.zeros_like(context)
        for i in range(module.pretraining_tp):
            output = output + nn.functional.linear(
                context[:, :, int(i * width): int((i + 1) * width)],
                module.dense.weight[:, int(i * width): int((i + 1) * width)])
    else:
        output = module.dense(context)
    output = nn.functional.dropout(output, p=module.hidden_dropout, training=module.training)
    return residual + output, probs


def falcon_attention(module: Any, layer: int, apply: Apply, needs_pattern: Callable[[int], bool],
                     hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, position_ids: Any = None,
                     layer_past: Any = None, use_cache: bool = False,
                     output_attentions: bool = False,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``FalconAttention.forward`` (transformers 5, its eager branches) with taps: rotary or
    ALiBi, one key/value head (multi-query), grouped or full heads."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    heads, d_head = module.num_heads, module.head_dim
    n_kv = heads if module.new_decoder_architecture else module.num_kv_heads
    query, key, value = module._split_heads(module.query_key_value(hidden_states))
    batch, q_length = query.shape[0], query.shape[1]
    query = query.transpose(1, 2).reshape(batch, heads, q_length, d_head)
    key = key.transpose(1, 2).reshape(batch, n_kv, q_length, d_head)
    value = value.transpose(1, 2).reshape(batch, n_kv, q_length, d_head)
    if alibi is None:
        if position_embeddings is None:
            raise ValueError("Falcon's rotary attention needs position_embeddings")
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    # the model broadcasts one key/value head over all query heads; taps see them expanded
    key = key.expand(batch, heads, -1, -1)
    value = value.expand(batch, heads, -1, -1)
    query = apply(layer, "q", query.transpose(1, 2)).transpose(1, 2)
    key = apply(layer, "k", key.transpose(1, 2)).transpose(1, 2)
    value = apply(layer, "v", value.transpose(1, 2)).transpose(1, 2)
    scores = query @ key.transpose(-1, -2)
    mask = 0.0 if attention_mask is None else attention_mask
    if alibi is None:
        probs = nn.functional.softmax(scores / d_head**0.5 + mask, dim=-1,
                                      dtype=hidden_states.dtype)
    else:
        # FalconModel has already put ALiBi / sqrt(d_head) into the mask, for every attention
        # implementation; transformers' eager branch adds ALiBi once more (its output_attentions
        # disagree with the sdpa branch the model runs by default). This follows sdpa.
        scores = scores.view(batch, heads, q_length, -1)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.to(torch.float32)
        probs = nn.functional.softmax(scores * module.inv_norm_factor + mask, dim=-1,
                                      dtype=hidden_states.dtype)
        probs = module.attention_dropout(probs)
    if needs_pattern(layer):
        probs = apply(layer, "pattern", probs)
    z = apply(layer, "z", (probs @ value).transpose(1, 2))
    return module.dense(z.reshape(batch, q_length, heads * d_head)), probs
