"""OPT: pre-LayerNorm decoder with learned positions offset by 2 and an MLP on flattened tokens."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites

OPT = Adapter(
    summary="learned positions offset by 2, MLP on flattened tokens",
    family="opt",
    model_types=("opt",),
    layers="model.decoder.layers",
    embed="model.decoder.embed_tokens",
    final_norm="model.decoder.final_layer_norm",
    unembed="lm_head",
    logits="lm_head",
    pos_embed="model.decoder.embed_positions",
    attention="self_attn",
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("self_attn_layer_norm", "output"),
        **projection_sites("self_attn"),
        "attn.out": Site("self_attn", "output"),
        # OPT's MLP runs on (batch * seq, d) tensors; probes see (batch, seq, d)
        "resid_mid": Site("final_layer_norm", "input_inplace", flat=True),
        "ln2": Site("final_layer_norm", "output", flat=True),
        "mlp.pre": Site("fc1", "output", flat=True),
        "mlp.post": Site("fc2", "input", flat=True),
        "mlp.out": Site("fc2", "output", flat=True),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("self_attn.q_proj.weight", "linear_heads_in"),
        "attn.W_K": WeightRule("self_attn.k_proj.weight", "linear_heads_in"),
        "attn.W_V": WeightRule("self_attn.v_proj.weight", "linear_heads_in"),
        "attn.b_Q": WeightRule("self_attn.q_proj.bias", "bias_heads"),
        "attn.b_K": WeightRule("self_attn.k_proj.bias", "bias_heads"),
        "attn.b_V": WeightRule("self_attn.v_proj.bias", "bias_heads"),
        "attn.W_O": WeightRule("self_attn.out_proj.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("self_attn.out_proj.bias", "identity"),
        "mlp.W_in": WeightRule("fc1.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("fc1.bias", "identity"),
        "mlp.W_out": WeightRule("fc2.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("fc2.bias", "identity"),
        "ln1.w": WeightRule("self_attn_layer_norm.weight", "identity"),
        "ln1.b": WeightRule("self_attn_layer_norm.bias", "identity"),
        "ln2.w": WeightRule("final_layer_norm.weight", "identity"),
        "ln2.b": WeightRule("final_layer_norm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("model.decoder.embed_tokens.weight", "identity"),
        # the table has two unused rows in front (OPT's padding offset): W_pos[p] is position p
        "pos_embed.W_pos": WeightRule("model.decoder.embed_positions.weight", "rows_from", 2),
        "ln_final.w": WeightRule("model.decoder.final_layer_norm.weight", "identity"),
        "ln_final.b": WeightRule("model.decoder.final_layer_norm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=(
        ("the position table is offset by 2 (a padding convention): pos_embed.W_pos drops those"
        " two rows, so W_pos[p] is the embedding of position p"),
        "attn.q is after the 1/sqrt(d_head) scaling, which OPT applies to the query projection",
        ("the post-LayerNorm variant (do_layer_norm_before=False, OPT-350m) is not covered:"
        " its ln1/ln2/resid_mid sites differ"),
    ),
)
