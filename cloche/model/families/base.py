"""The adapter record: where each canonical probe point and weight lives in a family's modules.

An adapter is a small table, not a fork of the model code: the Hugging Face model runs its own
``forward()`` and cloche only attaches hooks at the sites named here. A family that has no
adapter still loads and still offers every module's input and output as a probe point.

Sites are given relative to the model root (``embed``, ``layers``, ...) or to one block
(``block_sites``). A site is ``(module path, "input" | "output" | "input_inplace")``:
``input_inplace`` marks an input tensor that the model also keeps for a residual add, so a
replacement must be written into the tensor itself (see ``runtime.hooks``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict


@dataclass(frozen=True)
class Site:
    """A hook site: a module path and which of its tensors the point is."""

    module: str
    where: str  # "input" | "output" | "input_inplace"
    #: the tensor there is flattened to (batch * seq, width) by the model (OPT's MLP): probes
    #: see it as (batch, seq, width), like every other point
    flat: bool = False
    #: ``(k, n)``: the point is the k-th of n equal chunks of the last dimension of an output
    #: (Phi-3's fused gate_up_proj: the gate is chunk 0 of 2)
    part: tuple[int, int] | None = None
    #: the model later changes this output in place (Falcon's ``mlp_output += attention``):
    #: probes get a copy, so what they save stays what the point was
    mutated: bool = False
    #: ``(layout, k)``: the point is query (0), key (1) or value (2) of a fused q/k/v
    #: projection's output, laid out as ``"qkv"`` (all query heads, then the key heads, then
    #: the value heads: Phi-3) or ``"per_head"`` (each head's q, k, v in turn: GPT-NeoX)
    qkv: tuple[str, int] | None = None


@dataclass(frozen=True)
class WeightRule:
    """How to read one canonical weight from a raw parameter.

    ``layout`` names the transformation from the raw tensor to the canonical one (see
    ``model.weights``); ``part`` selects a slice of a fused tensor (e.g. 0/1/2 of GPT-2's c_attn).
    """

    param: str
    layout: str
    part: int | None = None


@dataclass(frozen=True)
class Adapter:
    """Everything cloche needs to know about one architecture family."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str | None
    unembed: str
    logits: str
    #: canonical suffix -> site, or several sites of which the first whose module exists is
    #: used (a family whose variants name a module differently: Falcon's ln_attn)
    block_sites: Mapping[str, Site | tuple[Site, ...]]
    block_weights: dict[str, WeightRule]
    global_weights: dict[str, WeightRule]
    #: path of the attention module inside a block (internals via AttentionInterface)
    attention: str | None
    gated_mlp: bool = False
    causal: bool = True
    notes: tuple[str, ...] = field(default=())
    #: one line for the README's table of families (what is special about this one)
    summary: str = ""
    #: attention and MLP read the same residual (GPT-J, Phi, Falcon): no ``resid_mid``. Strings
    #: name config attributes that switch it on (GPT-NeoX's ``use_parallel_residual``)
    parallel: bool | str | tuple[str, ...] = False
    #: for attention modules that do not call transformers' AttentionInterface: the name of
    #: their method ``(query, key, value, mask) -> (z, pattern)`` in (batch, head, seq, d)
    #: layout, which cloche wraps to reach q/k/v/pattern/z (GPT-Neo's ``_attn``), or a
    #: function of ``model.inline`` that stands in for their ``forward`` (BLOOM)
    attention_method: str | Callable[..., Any] | None = None
    #: the optional attention points (``q_proj``, ``k_proj``, ``v_proj``, ``k_grouped``,
    #: ``scores``) that a function ``attention_method`` taps itself (the inline families)
    method_taps: tuple[str, ...] = ()
    #: mixture-of-experts blocks: the router and the experts modules inside a block (their
    #: points are ``mlp.router`` and ``mlp.experts.{e}.post``; see ``model.moe``)
    router: str | None = None
    experts: str | None = None
    #: per-expert weights, relative to a block: canonical suffix (after ``mlp.experts.{e}.``)
    #: -> rule over the stacked parameter; ``part`` is filled with the expert's index
    expert_weights: Mapping[str, WeightRule] = field(default_factory=dict)
    #: a block returns ``(hidden, attention weights)``, not the hidden state alone (Falcon,
    #: BLOOM, GPT-Neo): a sharded model's stand-in blocks must return the same
    block_returns_tuple: bool = False
    #: found by ``model.discover`` on a model without a table (not one of ``ADAPTERS``)
    discovered: bool = False
    #: canonical block points (suffixes) this adapter does not offer, and why
    lacks: Mapping[str, str] = field(default_factory=dict)
    #: the learned position embedding module (its output is the ``pos_embed`` point)
    pos_embed: str | None = None
    #: TransformerLens names that mean something else in this family than in the generic
    #: table (``model.points``): TL name -> canonical name (BLOOM's ``hook_embed`` is after
    #: the embedding LayerNorm)
    tl_aliases: Mapping[str, str] = field(default_factory=dict)

    def is_parallel(self, config: object) -> bool:
        """Whether blocks of a model with ``config`` run attention and MLP in parallel."""
        if isinstance(self.parallel, bool):
            return self.parallel
        names = (self.parallel,) if isinstance(self.parallel, str) else self.parallel
        return any(bool(getattr(config, name, False)) for name in names)


class DecoderPaths(TypedDict):
    """Where a Llama-style decoder keeps its parts (most families since Llama do)."""

    layers: str
    embed: str
    final_norm: str
    unembed: str
    logits: str
    attention: str


#: ``Adapter(**DECODER_PATHS, ...)`` for a family laid out like Llama's transformers code
DECODER_PATHS = DecoderPaths(layers="model.layers", embed="model.embed_tokens",
                             final_norm="model.norm", unembed="lm_head", logits="lm_head",
                             attention="self_attn")


def projection_sites(attention: str, q: str = "q_proj", k: str = "k_proj", v: str = "v_proj"
                     ) -> dict[str, Site]:
    """``attn.q_proj``/``k_proj``/``v_proj`` for an attention module with separate query, key
    and value projections: their outputs, before any q/k norm and the rotary embedding, split
    into heads by the runtime (grouped-query keys and values keep their n_kv_heads heads)."""
    return {f"attn.{name}_proj": Site(f"{attention}.{module}", "output")
            for name, module in (("q", q), ("k", k), ("v", v))}
