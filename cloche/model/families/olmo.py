"""OLMo (weightless LayerNorms), OLMo 2 (norms after attention and MLP only, q/k RMSNorm) and
OLMoE (OLMo's mixture of experts)."""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, Site, WeightRule, projection_sites
from cloche.model.families.llama import LLAMA, LLAMA_BLOCK_SITES, LLAMA_BLOCK_WEIGHTS
from cloche.model.families.moe import MOE_EXPERT_WEIGHTS, MOE_NOTES, MOE_SITES, MOE_WEIGHTS

OLMO = Adapter(
    **DECODER_PATHS,
    family="olmo",
    summary="LayerNorms without weights, optional q/k/v clipping",
    model_types=("olmo",),
    gated_mlp=True,
    block_sites=LLAMA_BLOCK_SITES,
    block_weights=LLAMA_BLOCK_WEIGHTS,  # the norms have no weights: ln*.w do not exist
    global_weights=LLAMA.global_weights,
    notes=("OLMo's LayerNorms have no weight or bias: there are no ln1.w / ln2.w / ln_final.w",
           "attn.q/k/v are after the optional clip_qkv clamp and the rotary embedding"),
)

OLMO2 = Adapter(
    **DECODER_PATHS,
    summary="post-norms only, q/k RMSNorm over all heads",
    family="olmo2",
    model_types=("olmo2",),
    gated_mlp=True,
    block_sites={
        "resid_pre": Site("", "input"),
        **projection_sites("self_attn"),
        "attn.out": Site("post_attention_layernorm", "output"),
        "resid_mid": Site("mlp", "input_inplace"),
        "mlp.pre": Site("mlp.gate_proj", "output"),
        "mlp.pre_linear": Site("mlp.up_proj", "output"),
        "mlp.post": Site("mlp.down_proj", "input"),
        "mlp.out": Site("post_feedforward_layernorm", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        **{k: v for k, v in LLAMA_BLOCK_WEIGHTS.items() if not k.startswith("ln")},
        "attn.q_norm.w": WeightRule("self_attn.q_norm.weight", "identity"),
        "attn.k_norm.w": WeightRule("self_attn.k_norm.weight", "identity"),
        "ln1_post.w": WeightRule("post_attention_layernorm.weight", "identity"),
        "ln2_post.w": WeightRule("post_feedforward_layernorm.weight", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        "no norm before attention or MLP: both read the raw residual, so there is no ln1/ln2",
        ("attn.out and mlp.out are after the post-attention and post-feedforward norms (what is"
        " added to the residual); z @ W_O is the attention module's output before its norm"),
        ("queries and keys are RMS-normalised over all heads together before the rotary"
        " embedding; attn.q and attn.k are after both"),
    ),
)

OLMOE = Adapter(
    **DECODER_PATHS,
    family="olmoe",
    summary="mixture of experts, q/k RMSNorm over all heads",
    model_types=("olmoe",),
    gated_mlp=True,
    router="mlp.gate",
    experts="mlp.experts",
    expert_weights=MOE_EXPERT_WEIGHTS,
    block_sites=MOE_SITES,
    block_weights={
        **MOE_WEIGHTS,
        "attn.q_norm.w": WeightRule("self_attn.q_norm.weight", "identity"),
        "attn.k_norm.w": WeightRule("self_attn.k_norm.weight", "identity"),
    },
    global_weights=LLAMA.global_weights,
    notes=MOE_NOTES,
)
