"""Attention for families that compute it inline, written out with probe taps.

Most families call transformers' AttentionInterface, which cloche taps without touching the
model (``model.attention``). A few compute attention inside their attention module's
``forward``; for those, a run that probes an attention internal (``attn.q_proj/k_proj/v_proj``,
``q/k/v``, ``k_grouped``, ``scores``, ``pattern``, ``z``) replaces that module's ``forward`` (an
instance attribute, removed after the run) with the function here, which does what the model's
own code does, step for step, with a tap at each internal. Runs without attention probes use the
model's own code.

The taps mean what they mean for every other family (``model.attention``): ``q_proj/k_proj/
v_proj`` are the projections split into heads, before the rotary embedding, keys and values with
their own (key/value) heads; ``k_grouped`` the keys attention uses before those heads are
expanded; ``scores`` the scaled (and ALiBi-biased) scores with the mask applied, masked entries
``-inf``: when it is probed the pattern is the softmax of what the probes return.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cloche.model.attention import expand_heads, probed_scores_softmax

__all__ = ["bloom_attention", "falcon_attention", "gpt_neo_attention"]

Apply = Callable[[int, str, torch.Tensor], torch.Tensor]
Probed = Callable[[int, str], bool]


def _heads(apply: Apply, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
    """Tap ``which`` on ``x`` in (batch, head, seq, d) layout; probes see (batch, seq, head, d)."""
    return apply(layer, which, x.transpose(1, 2)).transpose(1, 2)


def _pattern(apply: Apply, probed: Probed, layer: int, scores: torch.Tensor,
             mask: torch.Tensor | None, own: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The softmax of probed ``scores`` (mask applied, TransformerLens' way) when someone probes
    them, else ``own()``: the model's own masking and softmax, bit for bit."""
    if not probed(layer, "scores"):
        return own()
    return probed_scores_softmax(lambda which, t: apply(layer, which, t), scores, mask,
                                 scores.shape[-1])


def gpt_neo_attention(module: Any, layer: int, apply: Apply, needs_pattern: Callable[[int], bool],
                      hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      layer_past: Any = None, use_cache: bool = False,
                      output_attentions: bool = False, *, probed: Probed, **kwargs: Any
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``GPTNeoSelfAttention.forward`` (transformers 5) with taps: unscaled scores, the local
    layers' window (the module's ``bias``), softmax in float32."""
    split = module._split_heads
    query = split(module.q_proj(hidden_states), module.num_heads, module.head_dim)
    key = split(module.k_proj(hidden_states), module.num_heads, module.head_dim)
    value = split(module.v_proj(hidden_states), module.num_heads, module.head_dim)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_id)
    key = _heads(apply, layer, "k_grouped", key)  # (no grouped-query heads: the same keys)
    query, key, value = (_heads(apply, layer, which, x)
                         for which, x in (("q", query), ("k", key), ("v", value)))
    scores = torch.matmul(query.to(torch.float32), key.to(torch.float32).transpose(-1, -2))
    q_length, k_length = query.size(-2), key.size(-2)
    window = module.bias[:, :, k_length - q_length : k_length, :k_length]

    def own() -> torch.Tensor:
        low = torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype,
                           device=scores.device)
        weights = torch.where(window, scores, low)
        if attention_mask is not None:
            weights = weights + attention_mask
        return nn.functional.softmax(weights, dim=-1)

    masked = scores.masked_fill(~window, -torch.inf)
    probs = _pattern(apply, probed, layer, masked, attention_mask, own).to(value.dtype)
    probs = module.attn_dropout(probs)
    if needs_pattern(layer):
        probs = apply(layer, "pattern", probs)
    z = _heads(apply, layer, "z", torch.matmul(probs, value))
    output = module.out_proj(module._merge_heads(z, module.num_heads, module.head_dim))
    return module.resid_dropout(output), probs


def bloom_attention(module: Any, layer: int, apply: Apply, needs_pattern: Callable[[int], bool],
                    hidden_states: torch.Tensor, residual: torch.Tensor, alibi: torch.Tensor,
                    attention_mask: torch.Tensor | None, layer_past: Any = None,
                    use_cache: bool = False, output_attentions: bool = False, *, probed: Probed,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``BloomAttention.forward`` (transformers 5) with taps: ALiBi scores, softmax, mixing.
    BLOOM has no rotary embedding and no grouped heads: ``q_proj`` is ``q``, ``k_proj`` is
    ``k_grouped`` is ``k`` (taps in that order, each seeing what the one before returned)."""
    batch, q_length, _ = hidden_states.shape
    heads, d_head = module.num_heads, module.head_dim
    query, key, value = module._reshape(module.query_key_value(hidden_states))
    query, key, value = (_heads(apply, layer, which, x) for which, x in (
        ("q_proj", query), ("k_proj", key), ("v_proj", value)))
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    key = _heads(apply, layer, "k_grouped", key)
    query, key, value = (_heads(apply, layer, which, x)
                         for which, x in (("q", query), ("k", key), ("v", value)))
    query = query.reshape(batch * heads, -1, d_head)
    key = key.reshape(batch * heads, -1, d_head).transpose(-1, -2)
    value = value.reshape(batch * heads, -1, d_head)
    scores = alibi.baddbmm(batch1=query, batch2=key, beta=module.beta,
                           alpha=module.inv_norm_factor).view(batch, heads, q_length, -1)

    def own() -> torch.Tensor:
        weights = scores if attention_mask is None else scores + attention_mask
        return nn.functional.softmax(weights, dim=-1, dtype=torch.float32)

    probs = _pattern(apply, probed, layer, scores, attention_mask, own).to(query.dtype)
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


def falcon_qkv(module: Any, fused: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Falcon's fused q/k/v output split into ``(batch, seq, head, d_head)`` queries and
    ``(batch, seq, kv_head, d_head)`` keys and values, per its layout: new_decoder_architecture
    (each key/value group: its queries, then its key, then its value), multi-query (all queries,
    one key, one value) or neither (each head's query, key, value in turn)."""
    batch, seq, _ = fused.shape
    heads, d_head = module.num_heads, module.head_dim
    if module.new_decoder_architecture:
        groups = fused.view(batch, seq, module.num_kv_heads, -1, d_head)
        return groups[:, :, :, :-2].flatten(2, 3), groups[:, :, :, -2], groups[:, :, :, -1]
    if module.multi_query:
        rows = fused.view(batch, seq, heads + 2, d_head)
        return rows[:, :, :-2], rows[:, :, -2:-1], rows[:, :, -1:]
    per_head = fused.view(batch, seq, heads, 3, d_head)
    return per_head[..., 0, :], per_head[..., 1, :], per_head[..., 2, :]


def falcon_attention(module: Any, layer: int, apply: Apply, needs_pattern: Callable[[int], bool],
                     hidden_states: torch.Tensor, alibi: torch.Tensor | None,
                     attention_mask: torch.Tensor | None, position_ids: Any = None,
                     layer_past: Any = None, use_cache: bool = False,
                     output_attentions: bool = False,
                     position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                     *, probed: Probed, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``FalconAttention.forward`` (transformers 5, its eager branches) with taps: rotary or
    ALiBi, one key/value head (multi-query), grouped or full heads."""
    from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

    heads, d_head = module.num_heads, module.head_dim
    query, key, value = falcon_qkv(module, module.query_key_value(hidden_states))
    query, key, value = (apply(layer, which, x) for which, x in (
        ("q_proj", query), ("k_proj", key), ("v_proj", value)))
    batch, q_length = query.shape[0], query.shape[1]
    query, key, value = (x.transpose(1, 2) for x in (query, key, value))
    if alibi is None:
        if position_embeddings is None:
            raise ValueError("Falcon's rotary attention needs position_embeddings")
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
    if layer_past is not None:
        key, value = layer_past.update(key, value, module.layer_idx)
    key = _heads(apply, layer, "k_grouped", key)
    # the model broadcasts each key/value head over its group of query heads (multi-query: one
    # over all); taps see them expanded
    key = expand_heads(key, heads // key.shape[1])
    value = expand_heads(value, heads // value.shape[1])
    query, key, value = (_heads(apply, layer, which, x)
                         for which, x in (("q", query), ("k", key), ("v", value)))
    scores = query @ key.transpose(-1, -2)
    if alibi is None:
        scores = scores / d_head**0.5

        def own() -> torch.Tensor:
            mask = 0.0 if attention_mask is None else attention_mask
            return nn.functional.softmax(scores + mask, dim=-1, dtype=hidden_states.dtype)
    else:
        # FalconModel has already put ALiBi / sqrt(d_head) into the mask, for every attention
        # implementation; transformers' eager branch adds ALiBi once more (its output_attentions
        # disagree with the sdpa branch the model runs by default). This follows sdpa.
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.to(torch.float32)
        scores = scores * module.inv_norm_factor

        def own() -> torch.Tensor:
            mask = 0.0 if attention_mask is None else attention_mask
            probs = nn.functional.softmax(scores + mask, dim=-1, dtype=hidden_states.dtype)
            return module.attention_dropout(probs)
    probs = _pattern(apply, probed, layer, scores, attention_mask, own).to(hidden_states.dtype)
    if needs_pattern(layer):
        probs = apply(layer, "pattern", probs)
    z = apply(layer, "z", (probs @ value).transpose(1, 2))
    return module.dense(z.reshape(batch, q_length, heads * d_head)), probs
