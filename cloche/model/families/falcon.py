"""Falcon: parallel attention and MLP (7B: one LayerNorm; 40B/180B: two), or sequential (RW).

Falcon computes attention inline (no AttentionInterface, no method to wrap): runs that probe
q/k/v/pattern/z use ``model.inline.falcon_attention`` (its eager attention written out with
taps) in place of the attention module's forward.
"""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule
from cloche.model.inline import falcon_attention

FALCON = Adapter(
    summary="parallel (one or two LayerNorms) or sequential blocks, rotary or ALiBi",
    family="falcon",
    model_types=("falcon",),
    layers="transformer.h",
    embed="transformer.word_embeddings",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    attention="self_attention",
    attention_method=falcon_attention,
    method_taps=("q_proj", "k_proj", "v_proj", "k_grouped", "scores"),
    block_returns_tuple=True,
    parallel=("parallel_attn", "new_decoder_architecture"),
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": (Site("input_layernorm", "output"), Site("ln_attn", "output")),
        "attn.out": Site("self_attention", "output"),
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": (Site("post_attention_layernorm", "output"), Site("ln_mlp", "output")),
        "mlp.pre": Site("mlp.dense_h_to_4h", "output"),
        "mlp.post": Site("mlp.dense_4h_to_h", "input"),
        # parallel blocks add the attention output into the MLP's output tensor in place
        "mlp.out": Site("mlp", "output", mutated=True),
        "resid_post": Site("", "output"),
    },
    block_weights={
        **{f"attn.W_{x}": WeightRule("self_attention.query_key_value.weight",
                                     "grouped_qkv_heads", k) for k, x in enumerate("QKV")},
        **{f"attn.b_{x}": WeightRule("self_attention.query_key_value.bias",
                                     "grouped_qkv_bias_heads", k) for k, x in enumerate("QKV")},
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
        "ln_final.w": WeightRule("transformer.ln_f.weight", "identity"),
        "ln_final.b": WeightRule("transformer.ln_f.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        ("attention (rotary or ALiBi) is computed inline; runs that probe its internals use"
         " cloche's copy of Falcon's eager attention. attn.k/v are expanded to every query head"
         " (multi-query and grouped layouts); attn.scores include ALiBi where the model has it"),
        ("W_Q/W_K/W_V are read from query_key_value in each variant's layout: W_K/W_V have one"
         " head (multi_query), num_kv_heads (new_decoder_architecture) or every head; so do"
         " attn.k_proj/v_proj and attn.k_grouped"),
        ("with parallel_attn or new_decoder_architecture, attention and MLP read the same residual:"
        " no resid_mid (ln2 is ln_mlp where the block has two LayerNorms)"),
    ),
)
