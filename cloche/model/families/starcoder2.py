"""StarCoder2: LayerNorm, rotary, grouped-query, sliding window, plain GELU MLP with biases."""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, Site, WeightRule, projection_sites
from cloche.model.families.llama import LLAMA_BLOCK_WEIGHTS

STARCODER2 = Adapter(
    **DECODER_PATHS,
    summary="LayerNorm, sliding window, plain GELU MLP",
    family="starcoder2",
    model_types=("starcoder2",),
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        **projection_sites("self_attn"),
        "attn.out": Site("self_attn", "output"),
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": Site("post_attention_layernorm", "output"),
        "mlp.pre": Site("mlp.c_fc", "output"),
        "mlp.post": Site("mlp.c_proj", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        **{k: v for k, v in LLAMA_BLOCK_WEIGHTS.items() if k.startswith("attn.")},
        "mlp.W_in": WeightRule("mlp.c_fc.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("mlp.c_fc.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.c_proj.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("mlp.c_proj.bias", "identity"),
        "ln1.w": WeightRule("input_layernorm.weight", "identity"),
        "ln1.b": WeightRule("input_layernorm.bias", "identity"),
        "ln2.w": WeightRule("post_attention_layernorm.weight", "identity"),
        "ln2.b": WeightRule("post_attention_layernorm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "ln_final.b": WeightRule("model.norm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(("with sliding_window set, attention sees only the last sliding_window tokens; the"
           " pattern is zero outside the window"),),
)
