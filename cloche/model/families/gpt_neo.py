"""GPT-Neo: GPT-2-like with learned positions, alternating global and local attention."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites
from cloche.model.inline import gpt_neo_attention

GPT_NEO = Adapter(
    summary="alternating global / local (sliding) attention, unscaled scores",
    family="gpt_neo",
    model_types=("gpt_neo",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    pos_embed="transformer.wpe",
    attention="attn.attention",
    attention_method=gpt_neo_attention,
    method_taps=("k_grouped", "scores"),
    block_returns_tuple=True,
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("ln_1", "output"),
        **projection_sites("attn.attention"),
        "attn.out": Site("attn", "output"),
        "resid_mid": Site("ln_2", "input_inplace"),
        "ln2": Site("ln_2", "output"),
        "mlp.pre": Site("mlp.c_fc", "output"),
        "mlp.post": Site("mlp.c_proj", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attn.attention.q_proj.weight", "linear_heads_in"),
        "attn.W_K": WeightRule("attn.attention.k_proj.weight", "linear_heads_in"),
        "attn.W_V": WeightRule("attn.attention.v_proj.weight", "linear_heads_in"),
        "attn.W_O": WeightRule("attn.attention.out_proj.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("attn.attention.out_proj.bias", "identity"),
        "mlp.W_in": WeightRule("mlp.c_fc.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("mlp.c_fc.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.c_proj.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("mlp.c_proj.bias", "identity"),
        "ln1.w": WeightRule("ln_1.weight", "identity"),
        "ln1.b": WeightRule("ln_1.bias", "identity"),
        "ln2.w": WeightRule("ln_2.weight", "identity"),
        "ln2.b": WeightRule("ln_2.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("transformer.wte.weight", "identity"),
        "pos_embed.W_pos": WeightRule("transformer.wpe.weight", "identity"),
        "ln_final.w": WeightRule("transformer.ln_f.weight", "identity"),
        "ln_final.b": WeightRule("transformer.ln_f.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        "attention scores are not scaled by 1/sqrt(d_head) (GPT-Neo's convention)",
        ("local layers (attention_types) attend to the last window_size tokens only; their"
        " pattern is zero outside the window"),
        ("GPT-Neo's attention does not use transformers' AttentionInterface: runs that probe"
         " its internals use cloche's copy of its eager attention (model.inline)"),
    ),
)
