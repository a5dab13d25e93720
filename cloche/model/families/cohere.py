"""Cohere (Command R): parallel attention and MLP off one LayerNorm, scaled logits."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites
from cloche.model.families.llama import LLAMA_BLOCK_WEIGHTS

COHERE = Adapter(
    family="cohere",
    summary="parallel attention + MLP, interleaved rotary, logits scaled by logit_scale",
    model_types=("cohere",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    logits="",  # the model's output: lm_head's output times logit_scale
    attention="self_attn",
    gated_mlp=True,
    parallel=True,
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        **projection_sites("self_attn"),
        "attn.out": Site("self_attn", "output"),
        "mlp.pre": Site("mlp.gate_proj", "output"),
        "mlp.pre_linear": Site("mlp.up_proj", "output"),
        "mlp.post": Site("mlp.down_proj", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        **{k: v for k, v in LLAMA_BLOCK_WEIGHTS.items() if k != "ln2.w"},
        "attn.q_norm.w": WeightRule("self_attn.q_norm.weight", "identity"),
        "attn.k_norm.w": WeightRule("self_attn.k_norm.weight", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        ("attention and MLP both read ln1's output and add to the same residual: no resid_mid and"
        " no ln2 (as in TransformerLens)"),
        "logits are the model's output: lm_head's output times logit_scale",
        ("the rotary embedding rotates interleaved pairs; attn.q and attn.k are after it (and after"
        " the optional per-head q/k LayerNorms)"),
    ),
)
