"""Phi-3: Llama-like with a fused q/k/v projection and a fused gate/up projection."""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, Site, WeightRule

PHI3 = Adapter(
    **DECODER_PATHS,
    summary="fused qkv and gate_up projections",
    family="phi3",
    model_types=("phi3",),
    gated_mlp=True,
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        # qkv_proj's output is [query heads | key heads | value heads]
        **{f"attn.{x}_proj": Site("self_attn.qkv_proj", "output", qkv=("qkv", k))
           for k, x in enumerate("qkv")},
        "attn.out": Site("self_attn", "output"),
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": Site("post_attention_layernorm", "output"),
        # gate_up_proj's output is [gate, up]: the gate is the pre-activation
        "mlp.pre": Site("mlp.gate_up_proj", "output", part=(0, 2)),
        "mlp.pre_linear": Site("mlp.gate_up_proj", "output", part=(1, 2)),
        "mlp.post": Site("mlp.down_proj", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("self_attn.qkv_proj.weight", "linear_qkv_heads", 0),
        "attn.W_K": WeightRule("self_attn.qkv_proj.weight", "linear_qkv_heads", 1),
        "attn.W_V": WeightRule("self_attn.qkv_proj.weight", "linear_qkv_heads", 2),
        "attn.W_O": WeightRule("self_attn.o_proj.weight", "linear_heads_out"),
        "mlp.W_gate": WeightRule("mlp.gate_up_proj.weight", "linear_half_in_out", 0),
        "mlp.W_in": WeightRule("mlp.gate_up_proj.weight", "linear_half_in_out", 1),
        "mlp.W_out": WeightRule("mlp.down_proj.weight", "linear_in_out"),
        "ln1.w": WeightRule("input_layernorm.weight", "identity"),
        "ln2.w": WeightRule("post_attention_layernorm.weight", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        "mlp.pre and mlp.pre_linear are the two halves of the fused gate_up_proj output",
        "attn.q and attn.k are after the (possibly partial) rotary embedding",
    ),
)
