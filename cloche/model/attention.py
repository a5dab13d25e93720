"""Probes inside attention: q, k, v, pattern and z.

Hugging Face models call attention through ``AttentionInterface``; cloche registers one more
implementation, ``"cloche"``, that computes eager attention and lets probes read or replace the
per-head queries, keys, values, pattern and mixed values. It is switched on for one run only, and
only when a probe is attached to an attention internal: otherwise the model runs its own attention
(sdpa, flash, ...) unchanged. The matching mask function must be registered as well, or the masks
transformers builds for an unknown implementation are silently wrong.

Canonical layouts: q/k/v/z are ``(batch, seq, head, d_head)`` (keys and values of grouped-query
attention expanded to every query head); pattern is ``(batch, head, query, key)``. Two more taps
exist here for TransformerLens' names: ``k_grouped``, the keys attention uses before grouped-query
heads are expanded, ``(batch, seq, kv_head, d_head)`` (TL's ``hook_rot_k``), and ``scores``, the
scaled (and soft-capped) scores with the mask applied, masked entries ``-inf``, before the
softmax, ``(batch, head, query, key)`` (TL's ``hook_attn_scores``). When ``scores`` is probed
the pattern is the softmax of the probed scores, a query that sees no key (a left pad) getting
an all-zero row, as in TransformerLens; otherwise the model's own mask arithmetic is kept.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn

IMPLEMENTATION = "cloche"

# (attention module -> layer index, apply(layer, which, tensor) -> tensor,
#  needs_pattern(layer) -> bool, probed(layer, which) -> bool); None outside runs
Tap = tuple[dict[int, int], Callable[[int, str, torch.Tensor], torch.Tensor],
            Callable[[int], bool], Callable[[int, str], bool]]
_ACTIVE: ContextVar[Tap | None] = ContextVar("cloche_attention_tap", default=None)
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, probed_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    _registered = True


def expand_heads(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def probed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager attention with probe taps, in the layout transformers passes (batch, head, seq, d).

    Returns ``(z, pattern)``; ``pattern`` is ``None`` when nobody probes it (the fused kernel
    then mixes the values, as transformers' sdpa attention does).
    """
    tap = _ACTIVE.get()
    layer = tap[0].get(id(module)) if tap is not None else None
    # apply(which, tensor) for this module's layer; None when nothing is probed here
    apply: Callable[[str, torch.Tensor], torch.Tensor] | None = None
    fused = False
    probe_scores = False
    if tap is not None and layer is not None:
        apply = functools.partial(tap[1], layer)
        fused = not tap[2](layer)
        probe_scores = tap[3](layer, "scores")
    n_rep = query.shape[1] // key.shape[1]
    if apply is not None:
        key = apply("k_grouped", key.transpose(1, 2)).transpose(1, 2)
    key = expand_heads(key, n_rep)
    value = expand_heads(value, n_rep)
    if apply is not None:
        query = apply("q", query.transpose(1, 2)).transpose(1, 2)
        key = apply("k", key.transpose(1, 2)).transpose(1, 2)
        value = apply("v", value.transpose(1, 2)).transpose(1, 2)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    softcap = kwargs.get("softcap")  # Gemma 2: tanh soft-capping of the scores, before the mask
    if apply is not None and fused and softcap is None:
        # nobody looks at this layer's pattern: let the fused kernel mix the values
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[-2]]
        z = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=dropout if module.training else 0.0,
            scale=scaling).transpose(1, 2).contiguous()
        return apply("z", z), None
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if isinstance(softcap, float | int):
        scores = torch.tanh(scores / softcap) * softcap
    if probe_scores and apply is not None:
        pattern = probed_scores_softmax(apply, scores, attention_mask, key.shape[-2])
        pattern = pattern.to(query.dtype)
    else:
        if attention_mask is not None:
            scores = scores + attention_mask[:, :, :, : key.shape[-2]]
        pattern = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    pattern = nn.functional.dropout(pattern, p=dropout, training=module.training)
    if apply is not None:
        pattern = apply("pattern", pattern)
    z = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    if apply is not None:
        z = apply("z", z)
    return z, pattern


def probed_scores_softmax(apply: Callable[[str, torch.Tensor], torch.Tensor],
                           scores: torch.Tensor, attention_mask: torch.Tensor | None,
                           n_keys: int) -> torch.Tensor:
    """The ``scores`` probes, then the softmax of what they return (TransformerLens' way).

    Masked entries are ``-inf`` (transformers' eager masks use the dtype's minimum); a row
    with no visible key softmaxes to zeros rather than NaN.
    """
    if attention_mask is not None:
        mask = attention_mask[:, :, :, :n_keys]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -torch.inf)
        else:
            hidden = mask <= torch.finfo(mask.dtype).min
            scores = (scores + mask.masked_fill(hidden, 0)).masked_fill(hidden, -torch.inf)
    scores = apply("scores", scores)
    blind = torch.isneginf(scores).all(dim=-1, keepdim=True)
    pattern = nn.functional.softmax(scores.masked_fill(blind, 0.0), dim=-1, dtype=torch.float32)
    return pattern.masked_fill(blind, 0.0)


def _tapped_method(original: Callable[..., Any], layer: int,
                   apply: Callable[[int, str, torch.Tensor], torch.Tensor],
                   needs_pattern: Callable[[int], bool]) -> Callable[..., Any]:
    """``original(query, key, value, mask, ...) -> (z, pattern)`` with probe taps around it."""

    def tapped(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        query = apply(layer, "q", query.transpose(1, 2)).transpose(1, 2)
        key = apply(layer, "k", key.transpose(1, 2)).transpose(1, 2)
        value = apply(layer, "v", value.transpose(1, 2)).transpose(1, 2)
        z, pattern = original(query, key, value, *args, **kwargs)
        if needs_pattern(layer) and pattern is not None:
            replaced = apply(layer, "pattern", pattern)
            if replaced is not pattern:  # the model's own mixing saw the old pattern
                z = torch.matmul(replaced.to(value.dtype), value)
            pattern = replaced
        z = apply(layer, "z", z.transpose(1, 2)).transpose(1, 2)
        return z, pattern

    return tapped


@contextlib.contextmanager
def attention_taps(
    hf_model: nn.Module,
    layer_of_module: dict[int, int],
    apply: Callable[[int, str, torch.Tensor], torch.Tensor],
    needs_pattern: Callable[[int], bool],
    method: tuple[str | Callable[..., Any], dict[int, nn.Module]] | None = None,
    probed: Callable[[int, str], bool] = lambda layer, which: False,
) -> Iterator[None]:
    """Route ``hf_model``'s attention through :func:`probed_attention` for the duration.

    ``method`` is ``(how, {layer: attention module})`` for modules that do not call the
    AttentionInterface: a method name (their method ``(q, k, v, mask) -> (z, pattern)`` is
    wrapped with the same taps), or a function ``(module, layer, apply, needs_pattern, *args,
    **kwargs)`` that replaces their ``forward`` (``model.inline``).
    """
    config: Any = hf_model.config  # a PretrainedConfig (nn.Module types attributes as tensors)
    previous = config._attn_implementation
    if method is not None:
        how, modules = method
        name = how if isinstance(how, str) else "forward"
        # the masks the model builds must be the eager (additive) ones these functions add
        config._attn_implementation = "eager"
        try:
            for layer, module in modules.items():
                # an instance attribute shadows the class's method; deleting it restores it
                module.__dict__[name] = (
                    _tapped_method(getattr(module, how), layer, apply, needs_pattern)
                    if isinstance(how, str)
                    else functools.partial(how, module, layer, apply, needs_pattern,
                                           probed=probed))
            yield
        finally:
            config._attn_implementation = previous
            for module in modules.values():
                module.__dict__.pop(name, None)
        return
    _register()
    token = _ACTIVE.set((layer_of_module, apply, needs_pattern, probed))
    config._attn_implementation = IMPLEMENTATION
    try:
        yield
    finally:
        config._attn_implementation = previous
        _ACTIVE.reset(token)
