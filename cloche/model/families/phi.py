"""Phi (1, 1.5, 2): parallel attention and MLP off one LayerNorm, partial rotary."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites

PHI = Adapter(
    summary="parallel attention + MLP, partial rotary",
    family="phi",
    model_types=("phi",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.final_layernorm",
    unembed="lm_head",
    logits="lm_head",
    attention="self_attn",
    parallel=True,
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        **projection_sites("self_attn"),
        "attn.out": Site("self_attn", "output"),
        "mlp.pre": Site("mlp.fc1", "output"),
        "mlp.post": Site("mlp.fc2", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("self_attn.q_proj.weight", "linear_heads_in"),
        "attn.W_K": WeightRule("self_attn.k_proj.weight", "linear_kv_heads_in"),
        "attn.W_V": WeightRule("self_attn.v_proj.weight", "linear_kv_heads_in"),
        "attn.b_Q": WeightRule("self_attn.q_proj.bias", "bias_heads"),
        "attn.b_K": WeightRule("self_attn.k_proj.bias", "bias_kv_heads"),
        "attn.b_V": WeightRule("self_attn.v_proj.bias", "bias_kv_heads"),
        "attn.W_O": WeightRule("self_attn.dense.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("self_attn.dense.bias", "identity"),
        "mlp.W_in": WeightRule("mlp.fc1.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("mlp.fc1.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.fc2.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("mlp.fc2.bias", "identity"),
        "ln1.w": WeightRule("input_layernorm.weight", "identity"),
        "ln1.b": WeightRule("input_layernorm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.final_layernorm.weight", "identity"),
        "ln_final.b": WeightRule("model.final_layernorm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
        "unembed.b_U": WeightRule("lm_head.bias", "identity"),
    },
    notes=(
        ("attention and MLP both read ln1's output and add to the same residual: no resid_mid and"
        " no ln2 (as in TransformerLens)"),
        ("rotary embedding on the first partial_rotary_factor of each head's dimensions;"
        " attn.q and attn.k are after it (and after the optional q/k LayerNorms)"),
    ),
)
