"""GPT-NeoX (Pythia): fused per-head q/k/v, parallel attention and MLP unless configured off."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule

GPT_NEOX = Adapter(
    summary="fused per-head q/k/v; parallel residual when configured",
    family="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    logits="lm_head",
    attention="attention",
    parallel="use_parallel_residual",
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        # query_key_value's output holds each head's query, key and value in turn
        **{f"attn.{x}_proj": Site("attention.query_key_value", "output", qkv=("per_head", k))
           for k, x in enumerate("qkv")},
        "attn.out": Site("attention", "output"),
        # resid_mid exists only without the parallel residual (Adapter.parallel)
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": Site("post_attention_layernorm", "output"),
        "mlp.pre": Site("mlp.dense_h_to_4h", "output"),
        "mlp.post": Site("mlp.dense_4h_to_h", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 0),
        "attn.W_K": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 1),
        "attn.W_V": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 2),
        "attn.b_Q": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 0),
        "attn.b_K": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 1),
        "attn.b_V": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 2),
        "attn.W_O": WeightRule("attention.dense.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("attention.dense.bias", "identity"),
        "mlp.W_in": WeightRule("mlp.dense_h_to_4h.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("mlp.dense_h_to_4h.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.dense_4h_to_h.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("mlp.dense_4h_to_h.bias", "identity"),
        "ln1.w": WeightRule("input_layernorm.weight", "identity"),
        "ln1.b": WeightRule("input_layernorm.bias", "identity"),
        "ln2.w": WeightRule("post_attention_layernorm.weight", "identity"),
        "ln2.b": WeightRule("post_attention_layernorm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("gpt_neox.embed_in.weight", "identity"),
        "ln_final.w": WeightRule("gpt_neox.final_layer_norm.weight", "identity"),
        "ln_final.b": WeightRule("gpt_neox.final_layer_norm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
)
