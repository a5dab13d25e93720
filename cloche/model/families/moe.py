"""Mixture-of-experts decoders: Mixtral and Qwen2-MoE (Llama-like attention, sparse MLP).

The MLP of a block is a router plus experts: its points are ``mlp.router`` (router logits,
(batch, seq, n_experts)) and ``mlp.experts.{e}.post`` (expert e's activations); ``mlp.out`` is
the whole sparse block's output. See ``model.moe`` for how experts are tapped.
"""

from __future__ import annotations

from cloche.model.families.base import DECODER_PATHS, Adapter, WeightRule
from cloche.model.families.llama import LLAMA, LLAMA_BLOCK_SITES, LLAMA_BLOCK_WEIGHTS

# the MLP sites and weights name modules only dense blocks have (Qwen2-MoE's mlp_only_layers):
# a sparse block's are absent, so they are not offered there
MOE_SITES = LLAMA_BLOCK_SITES
MOE_WEIGHTS = {
    **LLAMA_BLOCK_WEIGHTS,
    "mlp.W_router": WeightRule("mlp.gate.weight", "linear_in_out"),
}
#: expert e's weights in canonical layout, views of the stacked 3D parameters (transformers 5
#: keeps every expert of a block in one gate_up_proj and one down_proj)
MOE_EXPERT_WEIGHTS = {
    "W_gate": WeightRule("mlp.experts.gate_up_proj", "expert_gate_in_out"),
    "W_in": WeightRule("mlp.experts.gate_up_proj", "expert_up_in_out"),
    "W_out": WeightRule("mlp.experts.down_proj", "expert_out"),
}
MOE_NOTES = (
    ("mlp.experts.<e>.post is (batch, seq, d_expert): expert e's activations at the tokens"
    " routed to it, zero elsewhere (a replacement there is ignored)"),
    "replacing mlp.router re-routes: the top-k experts and their weights follow the new logits",
    ("expert e's weights are mlp.experts.<e>.W_gate / W_in (d_model, d_expert) and W_out"
    " (d_expert, d_model), views of the raw 3D parameters mlp.experts.gate_up_proj (experts,"
    " 2 * d_expert, d_model; gate rows first) and mlp.experts.down_proj (experts, d_model,"
    " d_expert); the router's is mlp.W_router (d_model, experts)"),
)

MIXTRAL = Adapter(
    **DECODER_PATHS,
    summary="mixture of experts: router logits, per-expert activations",
    family="mixtral",
    model_types=("mixtral",),
    gated_mlp=True,
    router="mlp.gate",
    experts="mlp.experts",
    expert_weights=MOE_EXPERT_WEIGHTS,
    block_sites=MOE_SITES,
    block_weights=MOE_WEIGHTS,
    global_weights=LLAMA.global_weights,
    notes=MOE_NOTES,
)

QWEN2_MOE = Adapter(
    **DECODER_PATHS,
    summary="mixture of experts with a gated shared expert",
    family="qwen2_moe",
    model_types=("qwen2_moe",),
    gated_mlp=True,
    router="mlp.gate",
    experts="mlp.experts",
    expert_weights=MOE_EXPERT_WEIGHTS,
    block_sites=MOE_SITES,
    block_weights={
        **MOE_WEIGHTS,
        "mlp.shared.W_gate": WeightRule("mlp.shared_expert.gate_proj.weight", "linear_in_out"),
        "mlp.shared.W_in": WeightRule("mlp.shared_expert.up_proj.weight", "linear_in_out"),
        "mlp.shared.W_out": WeightRule("mlp.shared_expert.down_proj.weight", "linear_in_out"),
    },
    global_weights=LLAMA.global_weights,
    notes=(
        *MOE_NOTES,
        ("mlp.out includes the shared expert (gated by a sigmoid); its activations are"
        " module:model.layers.<i>.mlp.shared_expert.down_proj:input"),
    ),
)

QWEN3_MOE = Adapter(
    **DECODER_PATHS,
    family="qwen3_moe",
    summary="mixture of experts, per-head q/k RMSNorm",
    model_types=("qwen3_moe",),
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
