"""Llama and its close relatives (Mistral, Qwen2): RMSNorm, rotary, gated MLP, grouped-query."""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, Site, WeightRule, projection_sites

LLAMA_BLOCK_SITES = {
    "resid_pre": Site("", "input"),
    "ln1": Site("input_layernorm", "output"),
    **projection_sites("self_attn"),
    "attn.out": Site("self_attn", "output"),
    "resid_mid": Site("post_attention_layernorm", "input_inplace"),
    "ln2": Site("post_attention_layernorm", "output"),
    "mlp.pre": Site("mlp.gate_proj", "output"),
    "mlp.pre_linear": Site("mlp.up_proj", "output"),
    "mlp.post": Site("mlp.down_proj", "input"),
    "mlp.out": Site("mlp", "output"),
    "resid_post": Site("", "output"),
}

LLAMA_BLOCK_WEIGHTS = {
    "attn.W_Q": WeightRule("self_attn.q_proj.weight", "linear_heads_in"),
    "attn.W_K": WeightRule("self_attn.k_proj.weight", "linear_kv_heads_in"),
    "attn.W_V": WeightRule("self_attn.v_proj.weight", "linear_kv_heads_in"),
    "attn.b_Q": WeightRule("self_attn.q_proj.bias", "bias_heads"),
    "attn.b_K": WeightRule("self_attn.k_proj.bias", "bias_kv_heads"),
    "attn.b_V": WeightRule("self_attn.v_proj.bias", "bias_kv_heads"),
    "attn.W_O": WeightRule("self_attn.o_proj.weight", "linear_heads_out"),
    "attn.b_O": WeightRule("self_attn.o_proj.bias", "identity"),
    "mlp.W_in": WeightRule("mlp.up_proj.weight", "linear_in_out"),
    "mlp.W_gate": WeightRule("mlp.gate_proj.weight", "linear_in_out"),
    "mlp.W_out": WeightRule("mlp.down_proj.weight", "linear_in_out"),
    "ln1.w": WeightRule("input_layernorm.weight", "identity"),
    "ln2.w": WeightRule("post_attention_layernorm.weight", "identity"),
}

LLAMA = Adapter(
    **DECODER_PATHS,
    summary="RMSNorm, rotary, gated MLP, grouped-query KV",
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    gated_mlp=True,
    block_sites=LLAMA_BLOCK_SITES,
    block_weights=LLAMA_BLOCK_WEIGHTS,
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=("attn.q and attn.k are after the rotary embedding: the values attention really uses",),
)

QWEN3 = Adapter(
    **DECODER_PATHS,
    summary="per-head q/k RMSNorm before rotary",
    family="qwen3",
    model_types=("qwen3",),
    gated_mlp=True,
    block_sites=LLAMA_BLOCK_SITES,
    block_weights={
        **LLAMA_BLOCK_WEIGHTS,
        "attn.q_norm.w": WeightRule("self_attn.q_norm.weight", "identity"),
        "attn.k_norm.w": WeightRule("self_attn.k_norm.weight", "identity"),
    },
    global_weights=LLAMA.global_weights,
    notes=(("queries and keys are RMS-normalised per head before the rotary embedding; attn.q"
           " and attn.k are after both: the values attention really uses"),),
)
