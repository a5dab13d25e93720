"""BLOOM: ALiBi attention, a LayerNorm on the embeddings, fused per-head q/k/v.

BLOOM computes attention inline (ALiBi added with ``baddbmm``, no AttentionInterface, no
method to wrap): runs that probe q/k/v/pattern/z use ``model.inline.bloom_attention`` instead
of its forward. Its attention and MLP modules add the residual themselves, so ``attn.out`` and
``mlp.out`` are the output projections.
"""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule
from cloche.model.inline import bloom_attention

BLOOM = Adapter(
    summary="ALiBi, LayerNorm on the embeddings",
    family="bloom",
    model_types=("bloom",),
    layers="transformer.h",
    embed="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    attention="self_attention",
    attention_method=bloom_attention,
    method_taps=("q_proj", "k_proj", "v_proj", "k_grouped", "scores"),
    block_returns_tuple=True,
    # TransformerLens' hook_embed is after the embedding LayerNorm: block 0's input
    tl_aliases={"hook_embed": "layers.0.resid_pre"},
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        "attn.out": Site("self_attention.dense", "output"),
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": Site("post_attention_layernorm", "output"),
        "mlp.pre": Site("mlp.dense_h_to_4h", "output"),
        "mlp.post": Site("mlp.dense_4h_to_h", "input"),
        "mlp.out": Site("mlp.dense_4h_to_h", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("self_attention.query_key_value.weight", "neox_qkv_heads", 0),
        "attn.W_K": WeightRule("self_attention.query_key_value.weight", "neox_qkv_heads", 1),
        "attn.W_V": WeightRule("self_attention.query_key_value.weight", "neox_qkv_heads", 2),
        "attn.b_Q": WeightRule("self_attention.query_key_value.bias", "neox_qkv_bias_heads", 0),
        "attn.b_K": WeightRule("self_attention.query_key_value.bias", "neox_qkv_bias_heads", 1),
        "attn.b_V": WeightRule("self_attention.query_key_value.bias", "neox_qkv_bias_heads", 2),
        "attn.W_O": WeightRule("self_attention.dense.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("self_attention.dense.bias", "identity"),
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
        "embed.W_E": WeightRule("transformer.word_embeddings.weight", "identity"),
        "embed.ln.w": WeightRule("transformer.word_embeddings_layernorm.weight", "identity"),
        "embed.ln.b": WeightRule("transformer.word_embeddings_layernorm.bias", "identity"),
        "ln_final.w": WeightRule("transformer.ln_f.weight", "identity"),
        "ln_final.b": WeightRule("transformer.ln_f.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        "embed is the raw token embedding; resid_pre of block 0 is after the embedding LayerNorm",
        ("attention uses ALiBi (a per-head linear bias on distance, no position embeddings);"
         " attn.scores are the biased scores and attn.pattern their softmax, as the model"
         " computes it; no rotary: attn.q_proj is attn.q"),
        ("the apply_residual_connection_post_layernorm variant is not covered (its resid_mid"
        " differs)"),
    ),
)
