"""GPT-2: fused Conv1D q/k/v, learned positions, tied unembedding."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule

GPT2 = Adapter(
    summary="fused Conv1D q/k/v, learned positions",
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    pos_embed="transformer.wpe",
    attention="attn",
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("ln_1", "output"),
        "attn.q_proj": Site("attn.c_attn", "output", part=(0, 3)),
        "attn.k_proj": Site("attn.c_attn", "output", part=(1, 3)),
        "attn.v_proj": Site("attn.c_attn", "output", part=(2, 3)),
        "attn.out": Site("attn", "output"),
        "resid_mid": Site("ln_2", "input_inplace"),
        "ln2": Site("ln_2", "output"),
        "mlp.pre": Site("mlp.c_fc", "output"),
        "mlp.post": Site("mlp.c_proj", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attn.c_attn.weight", "conv1d_qkv_heads", 0),
        "attn.W_K": WeightRule("attn.c_attn.weight", "conv1d_qkv_heads", 1),
        "attn.W_V": WeightRule("attn.c_attn.weight", "conv1d_qkv_heads", 2),
        "attn.b_Q": WeightRule("attn.c_attn.bias", "qkv_bias_heads", 0),
        "attn.b_K": WeightRule("attn.c_attn.bias", "qkv_bias_heads", 1),
        "attn.b_V": WeightRule("attn.c_attn.bias", "qkv_bias_heads", 2),
        "attn.W_O": WeightRule("attn.c_proj.weight", "conv1d_out_heads"),
        "attn.b_O": WeightRule("attn.c_proj.bias", "identity"),
        "mlp.W_in": WeightRule("mlp.c_fc.weight", "identity"),
        "mlp.b_in": WeightRule("mlp.c_fc.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.c_proj.weight", "identity"),
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
)
