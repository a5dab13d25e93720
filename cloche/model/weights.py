"""Canonical weight names: per-head attention matrices, MLP in/out, embeddings, norms.

Canonical layouts follow TransformerLens, so results read the same as in its papers and
tutorials: ``W_Q`` is ``(n_heads, d_model, d_head)``, ``W_K/W_V`` are ``(n_kv_heads, d_model,
d_head)`` (``n_kv_heads < n_heads`` for grouped-query attention), ``W_O`` is
``(n_heads, d_head, d_model)``, ``W_in``/``W_gate`` are ``(d_model, d_mlp)``, ``W_out`` is
``(d_mlp, d_model)``, ``W_E`` is ``(d_vocab, d_model)`` and ``W_U`` is ``(d_model, d_vocab)``.
Each is a view or a cheap reshape of the raw parameter, never a copy of the whole model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import torch

from cloche.errors import UnknownProbePoint, UsageError
from cloche.model.families import Adapter, WeightRule


@dataclass(frozen=True)
class HeadShape:
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_model: int
    #: the padding token's id: RoBERTa's position table starts its positions after it
    pad_token_id: int | None = None


def head_shape(config: Any) -> HeadShape:
    """Attention geometry from a Hugging Face config."""
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    # (Falcon names it num_kv_heads; its multi-query models, like GPT-BigCode's, have one)
    n_kv = int(getattr(config, "num_key_value_heads", None) or getattr(config, "num_kv_heads", None)
               or n_heads)
    if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture",
                                                             False):
        n_kv = 1
    d_head = int(getattr(config, "head_dim", None) or d_model // n_heads)
    pad = getattr(config, "pad_token_id", None)
    return HeadShape(n_heads, n_kv, d_head, d_model, pad if isinstance(pad, int) else None)


def _split_heads_in(w_in_out: torch.Tensor, heads: int, d_head: int) -> torch.Tensor:
    """(d_model, heads*d_head) -> (heads, d_model, d_head)."""
    return w_in_out.reshape(w_in_out.shape[0], heads, d_head).permute(1, 0, 2)


def apply_layout(raw: torch.Tensor, rule: WeightRule, hs: HeadShape) -> torch.Tensor:
    """Turn a raw parameter into its canonical layout."""
    layout, part = rule.layout, rule.part
    if layout == "identity":
        return raw
    if layout == "linear_in_out":
        return raw.T
    if layout == "linear_heads_in":
        return _split_heads_in(raw.T, hs.n_heads, hs.d_head)
    if layout == "linear_kv_heads_in":
        return _split_heads_in(raw.T, hs.n_kv_heads, hs.d_head)
    if layout == "linear_heads_out":
        return raw.T.reshape(hs.n_heads, hs.d_head, raw.shape[0])
    if layout == "bias_heads":
        return raw.reshape(hs.n_heads, hs.d_head)
    if layout == "bias_kv_heads":
        return raw.reshape(hs.n_kv_heads, hs.d_head)
    if layout == "conv1d_out_heads":
        return raw.reshape(hs.n_heads, hs.d_head, raw.shape[1])
    if layout == "rows_after_padding":  # RoBERTa: position p is row padding_idx + 1 + p
        if hs.pad_token_id is None:
            raise UsageError(f"{rule.param!r} is read after the padding index, and this"
                             " model's config has no pad_token_id")
        return raw[hs.pad_token_id + 1 :]
    width = hs.n_heads * hs.d_head
    if part is None:  # every layout below reads one part of a fused tensor
        raise UsageError(f"weight layout {layout!r} of {rule.param!r} is unknown or lacks the"
                         " part of the fused tensor it reads (an adapter table is wrong)")
    if layout == "linear_qkv_heads":  # rows: all query heads, then key heads, then value heads
        q, kv = hs.n_heads * hs.d_head, hs.n_kv_heads * hs.d_head
        start, heads = ((0, hs.n_heads), (q, hs.n_kv_heads), (q + kv, hs.n_kv_heads))[part]
        return _split_heads_in(raw[start : start + heads * hs.d_head].T, heads, hs.d_head)
    if layout == "linear_half_in_out":  # a Linear whose rows are two matrices (gate, up)
        half = raw.shape[0] // 2
        return raw[part * half : (part + 1) * half].T
    if layout == "rows_from":  # a table with ``part`` unused rows in front (OPT's positions)
        return raw[part:]
    if layout == "conv1d_qkv_heads":
        return _split_heads_in(raw[:, part * width : (part + 1) * width], hs.n_heads, hs.d_head)
    if layout == "qkv_bias_heads":
        return raw[part * width : (part + 1) * width].reshape(hs.n_heads, hs.d_head)
    if layout in ("expert_gate_in_out", "expert_up_in_out"):  # (experts, 2 * d_expert, d_model)
        half = raw.shape[1] // 2
        start = 0 if layout == "expert_gate_in_out" else half
        return raw[part, start : start + half].T
    if layout == "expert_out":  # (experts, d_model, d_expert)
        return raw[part].T
    if layout in ("grouped_qkv_heads", "grouped_qkv_bias_heads"):
        # rows: for each key/value head, its group of query heads, then its key, then its value
        # (Falcon; with one query per group this is GPT-NeoX's layout, with one group it is
        # multi-query's [all queries, key, value])
        group = hs.n_heads // hs.n_kv_heads
        rows = raw.reshape(hs.n_kv_heads, group + 2, hs.d_head, *raw.shape[1:])
        picked = (rows[:, :group].flatten(0, 1) if part == 0 else rows[:, group + part - 1])
        return picked.transpose(1, 2) if layout == "grouped_qkv_heads" else picked
    if layout == "neox_qkv_heads":
        per_head = raw.reshape(hs.n_heads, 3, hs.d_head, raw.shape[1])[:, part]
        return per_head.transpose(1, 2)
    if layout == "neox_qkv_bias_heads":
        return raw.reshape(hs.n_heads, 3, hs.d_head)[:, part]
    raise UsageError(f"unknown weight layout {layout!r} (an adapter table is wrong)")


def canonical_weights(adapter: Adapter | None, n_layers: int, n_experts: int = 0
                      ) -> dict[str, tuple[str, WeightRule]]:
    """Canonical name -> (raw parameter name, rule) for every weight the adapter knows
    (``layers.{i}.mlp.experts.{e}.*`` for each of ``n_experts`` experts of a sparse block)."""
    if adapter is None:
        return {}
    table: dict[str, tuple[str, WeightRule]] = {}
    for name, rule in adapter.global_weights.items():
        table[name] = (rule.param, rule)
    for i in range(n_layers):
        for suffix, rule in adapter.block_weights.items():
            table[f"layers.{i}.{suffix}"] = (f"{adapter.layers}.{i}.{rule.param}", rule)
        for e in range(n_experts):
            for suffix, rule in adapter.expert_weights.items():
                table[f"layers.{i}.mlp.experts.{e}.{suffix}"] = (
                    f"{adapter.layers}.{i}.{rule.param}", replace(rule, part=e))
    return table


def expert_count(config: Any) -> int:
    """How many experts a sparse block of a model with ``config`` has (0 for a dense model)."""
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
               or 0)


_TL_GLOBAL_WEIGHTS = {"W_E": "embed.W_E", "W_U": "unembed.W_U", "W_pos": "pos_embed.W_pos"}
_TL_BLOCK_WEIGHT = re.compile(r"^blocks\.(\d+)\.(\w+\.\w+)$")


def tl_weight_name(name: str) -> str:
    """The canonical name of a TransformerLens weight name (``blocks.0.attn.W_Q`` ->
    ``layers.0.attn.W_Q``, ``W_E`` -> ``embed.W_E``); other names are returned unchanged.

    The canonical layouts are TransformerLens' own, so the tensors are the same as well.
    """
    if name in _TL_GLOBAL_WEIGHTS:
        return _TL_GLOBAL_WEIGHTS[name]
    match = _TL_BLOCK_WEIGHT.match(name)
    return f"layers.{match.group(1)}.{match.group(2)}" if match else name


class WeightCatalog:
    """Canonical and raw weight names of one model, resolved the same way on every executor.

    ``raw_names`` are the model's parameter names (a sharded model passes the whole model's,
    from its meta-device skeleton, so that every rank and rank 0 agree on what exists).
    """

    def __init__(self, adapter: Adapter | None, n_layers: int, raw_names: list[str],
                 n_experts: int = 0) -> None:
        self._canonical = canonical_weights(adapter, n_layers, n_experts)
        self._raw = list(raw_names)
        self._present = set(raw_names)

    def names(self, canonical: bool = True) -> list[str]:
        """Canonical names whose parameter exists (if ``canonical``), then every raw name."""
        if not canonical:
            return list(self._raw)
        return [n for n, (raw, _) in self._canonical.items() if raw in self._present] + self._raw

    def resolve(self, name: str) -> tuple[str, WeightRule | None]:
        """``(raw parameter name, layout rule or None for a raw name)``; clear errors otherwise."""
        if not isinstance(name, str):
            raise UsageError(f"weight names are strings, not {name!r}")
        if name not in self._canonical and name not in self._present:
            name = tl_weight_name(name)
        if name in self._canonical:
            raw, rule = self._canonical[name]
            if raw not in self._present:
                raise UnknownProbePoint(f"this model has no weight {name!r} ({raw} is absent)")
            return raw, rule
        if name in self._present:
            return name, None
        close = [n for n in self._canonical if n.endswith(name.split(".")[-1])][:5]
        raise UnknownProbePoint(f"unknown weight {name!r}"
                                + (f"; did you mean {close}?" if close else ""))


def read_weight(param: torch.nn.Parameter, rule: WeightRule | None, hs: HeadShape, *,
                grad: bool, name: str) -> torch.Tensor:
    """A detached view of ``param`` (or its gradient) in the canonical layout of ``rule``."""
    tensor = param.grad if grad else param
    if tensor is None:
        raise UsageError(f"{name!r} has no gradient: run with backward= first")
    tensor = tensor.detach()
    return tensor if rule is None else apply_layout(tensor, rule, hs)
