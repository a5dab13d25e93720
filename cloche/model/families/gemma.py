"""Gemma, Gemma 2 and Gemma 3 (text): scaled embeddings, (1 + w) RMSNorms, gated GELU MLP.

Gemma 2 and 3 add a norm after attention and after the MLP (before each residual add), so
``attn.out`` and ``mlp.out`` are those post-norms' outputs: what the block adds to the residual
stream (as in TransformerLens). Gemma 2 soft-caps attention scores and the final logits.
"""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, Site, WeightRule, projection_sites
from cloche.model.families.llama import LLAMA_BLOCK_SITES, LLAMA_BLOCK_WEIGHTS

_GLOBAL = {
    "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
    "ln_final.w": WeightRule("model.norm.weight", "identity"),
    "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
}
_NOTES = (
    "embed is the scaled embedding (W_E[token] * sqrt(d_model)), as the model adds it",
    "RMSNorm weights act as (1 + w): ln*.w are the raw parameters",
    "attn.q and attn.k are after the rotary embedding: the values attention really uses",
)

GEMMA = Adapter(
    **DECODER_PATHS,
    summary="embeddings scaled by sqrt(d_model), (1 + w) RMSNorm",
    family="gemma",
    model_types=("gemma",),
    gated_mlp=True,
    block_sites=LLAMA_BLOCK_SITES,
    block_weights=LLAMA_BLOCK_WEIGHTS,
    global_weights=_GLOBAL,
    notes=_NOTES,
)

_SANDWICH_SITES = {
    "resid_pre": Site("", "input"),
    "ln1": Site("input_layernorm", "output"),
    **projection_sites("self_attn"),
    "attn.out": Site("post_attention_layernorm", "output"),
    "resid_mid": Site("pre_feedforward_layernorm", "input_inplace"),
    "ln2": Site("pre_feedforward_layernorm", "output"),
    "mlp.pre": Site("mlp.gate_proj", "output"),
    "mlp.pre_linear": Site("mlp.up_proj", "output"),
    "mlp.post": Site("mlp.down_proj", "input"),
    "mlp.out": Site("post_feedforward_layernorm", "output"),
    "resid_post": Site("", "output"),
}
_SANDWICH_WEIGHTS = {
    **{k: v for k, v in LLAMA_BLOCK_WEIGHTS.items() if not k.startswith("ln")},
    "ln1.w": WeightRule("input_layernorm.weight", "identity"),
    "ln1_post.w": WeightRule("post_attention_layernorm.weight", "identity"),
    "ln2.w": WeightRule("pre_feedforward_layernorm.weight", "identity"),
    "ln2_post.w": WeightRule("post_feedforward_layernorm.weight", "identity"),
}
_SANDWICH_NOTES = (
    *_NOTES,
    ("attn.out and mlp.out are after the post-attention and post-feedforward norms (what is"
    " added to the residual); z @ W_O is the attention module's output before its norm"),
)

GEMMA2 = Adapter(
    summary="pre + post norms, attention and final-logit soft-capping, sliding window",
    family="gemma2",
    model_types=("gemma2",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    logits="",  # the model's output: logits after the final soft-capping
    attention="self_attn",
    gated_mlp=True,
    block_sites=_SANDWICH_SITES,
    block_weights=_SANDWICH_WEIGHTS,
    global_weights=_GLOBAL,
    notes=(
        *_SANDWICH_NOTES,
        ("attention scores are soft-capped (tanh) before the mask and softmax; attn.pattern is"
        " the real softmax of the capped scores"),
        "logits are after the final soft-capping (what the model returns)",
        "every other layer attends within a sliding window; its pattern is zero outside it",
    ),
)

GEMMA3 = Adapter(
    summary="pre + post norms, q/k norms, sliding-window layers",
    family="gemma3",
    model_types=("gemma3_text",),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    logits="",  # the model's output: logits after the (optional) final soft-capping
    attention="self_attn",
    gated_mlp=True,
    block_sites=_SANDWICH_SITES,
    block_weights={
        **_SANDWICH_WEIGHTS,
        "attn.q_norm.w": WeightRule("self_attn.q_norm.weight", "identity"),
        "attn.k_norm.w": WeightRule("self_attn.k_norm.weight", "identity"),
    },
    global_weights=_GLOBAL,
    notes=(
        *_SANDWICH_NOTES,
        ("queries and keys are RMS-normalised per head before the rotary embedding; attn.q and"
        " attn.k are after both"),
        ("sliding-window layers (layer_types) attend within the window only; their pattern is"
        " zero outside it"),
    ),
)
