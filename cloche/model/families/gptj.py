"""GPT-J: parallel attention and MLP off one LayerNorm, partial rotary, biased unembedding."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites

GPTJ = Adapter(
    summary="parallel attention + MLP, partial interleaved rotary",
    family="gptj",
    model_types=("gptj",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    attention="attn",
    parallel=True,
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("ln_1", "output"),
        **projection_sites("attn"),
        "attn.out": Site("attn", "output"),
        "mlp.pre": Site("mlp.fc_in", "output"),
        "mlp.post": Site("mlp.fc_out", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attn.q_proj.weight", "linear_heads_in"),
        "attn.W_K": WeightRule("attn.k_proj.weight", "linear_heads_in"),
        "attn.W_V": WeightRule("attn.v_proj.weight", "linear_heads_in"),
        "attn.W_O": WeightRule("attn.out_proj.weight", "linear_heads_out"),
        "mlp.W_in": WeightRule("mlp.fc_in.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("mlp.fc_in.bias", "identity"),
        "mlp.W_out": WeightRule("mlp.fc_out.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("mlp.fc_out.bias", "identity"),
        "ln1.w": WeightRule("ln_1.weight", "identity"),
        "ln1.b": WeightRule("ln_1.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("transformer.wte.weight", "identity"),
        "ln_final.w": WeightRule("transformer.ln_f.weight", "identity"),
        "ln_final.b": WeightRule("transformer.ln_f.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
        "unembed.b_U": WeightRule("lm_head.bias", "identity"),
    },
    notes=(
        ("attention and MLP both read ln1's output and add to the same residual: no resid_mid and"
        " no ln2 (as in TransformerLens)"),
        ("rotary embedding on the first rotary_dim dimensions of each head (interleaved pairs);"
        " attn.q and attn.k are after it"),
    ),
)
