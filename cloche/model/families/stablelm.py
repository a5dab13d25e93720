"""StableLM: LayerNorm, partial rotary, optional parallel residual and q/k LayerNorms."""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, WeightRule
from cloche.model.families.llama import LLAMA_BLOCK_SITES, LLAMA_BLOCK_WEIGHTS

STABLELM = Adapter(
    **DECODER_PATHS,
    summary="partial rotary, optional parallel residual and q/k LayerNorms",
    family="stablelm",
    model_types=("stablelm",),
    gated_mlp=True,
    parallel="use_parallel_residual",
    block_sites=LLAMA_BLOCK_SITES,
    block_weights={
        **LLAMA_BLOCK_WEIGHTS,
        "ln1.b": WeightRule("input_layernorm.bias", "identity"),
        "ln2.b": WeightRule("post_attention_layernorm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "ln_final.b": WeightRule("model.norm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        ("rotary embedding on the first partial_rotary_factor of each head's dimensions;"
        " attn.q and attn.k are after it (and after the optional per-head q/k LayerNorms)"),
        ("with use_parallel_residual, attention and MLP read ln1's output in parallel: no"
        " resid_mid and no ln2"),
    ),
)
