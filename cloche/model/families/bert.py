"""BERT: post-LayerNorm encoder, bidirectional attention, masked-LM head."""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule, projection_sites

BERT = Adapter(
    summary="post-LayerNorm encoder, bidirectional",
    family="bert",
    model_types=("bert",),
    layers="bert.encoder.layer",
    embed="bert.embeddings.word_embeddings",
    pos_embed="bert.embeddings.position_embeddings",
    final_norm=None,
    unembed="cls.predictions.decoder",
    logits="cls",
    attention="attention.self",
    causal=False,
    block_sites={
        "resid_pre": Site("", "input"),
        **projection_sites("attention.self", "query", "key", "value"),
        "attn.out": Site("attention.output.dense", "output"),
        "resid_mid": Site("attention", "output"),
        "mlp.pre": Site("intermediate.dense", "output"),
        "mlp.post": Site("output.dense", "input"),
        "mlp.out": Site("output.dense", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attention.self.query.weight", "linear_heads_in"),
        "attn.W_K": WeightRule("attention.self.key.weight", "linear_heads_in"),
        "attn.W_V": WeightRule("attention.self.value.weight", "linear_heads_in"),
        "attn.b_Q": WeightRule("attention.self.query.bias", "bias_heads"),
        "attn.b_K": WeightRule("attention.self.key.bias", "bias_heads"),
        "attn.b_V": WeightRule("attention.self.value.bias", "bias_heads"),
        "attn.W_O": WeightRule("attention.output.dense.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("attention.output.dense.bias", "identity"),
        "mlp.W_in": WeightRule("intermediate.dense.weight", "linear_in_out"),
        "mlp.b_in": WeightRule("intermediate.dense.bias", "identity"),
        "mlp.W_out": WeightRule("output.dense.weight", "linear_in_out"),
        "mlp.b_out": WeightRule("output.dense.bias", "identity"),
        "ln1.w": WeightRule("attention.output.LayerNorm.weight", "identity"),
        "ln1.b": WeightRule("attention.output.LayerNorm.bias", "identity"),
        "ln2.w": WeightRule("output.LayerNorm.weight", "identity"),
        "ln2.b": WeightRule("output.LayerNorm.bias", "identity"),
    },
    global_weights={
        "embed.W_E": WeightRule("bert.embeddings.word_embeddings.weight", "identity"),
        "pos_embed.W_pos": WeightRule("bert.embeddings.position_embeddings.weight", "identity"),
        "unembed.W_U": WeightRule("cls.predictions.decoder.weight", "linear_in_out"),
    },
    notes=(
        "BERT is post-LayerNorm: resid_mid is the attention block's output after its LayerNorm",
        "ln1 / ln2 weights are the post-attention and post-MLP LayerNorms",
    ),
)

ROBERTA = Adapter(
    summary="post-LayerNorm encoder, positions after the padding index",
    family="roberta",
    model_types=("roberta",),
    layers="roberta.encoder.layer",
    embed="roberta.embeddings.word_embeddings",
    pos_embed="roberta.embeddings.position_embeddings",
    final_norm=None,
    unembed="lm_head.decoder",
    logits="lm_head",
    attention="attention.self",
    causal=False,
    block_sites=BERT.block_sites,
    block_weights=BERT.block_weights,
    global_weights={
        "embed.W_E": WeightRule("roberta.embeddings.word_embeddings.weight", "identity"),
        "pos_embed.W_pos": WeightRule("roberta.embeddings.position_embeddings.weight",
                                      "rows_after_padding"),
        "unembed.W_U": WeightRule("lm_head.decoder.weight", "linear_in_out"),
        "unembed.b_U": WeightRule("lm_head.bias", "identity"),
    },
    notes=(
        *BERT.notes,
        ("position ids start after the padding index: pos_embed.W_pos[p] is row padding_idx +"
         " 1 + p of roberta.embeddings.position_embeddings.weight (the rows in front are"
         " unused); a padding token gets row padding_idx and is not counted in the positions"
         " of the tokens after it (the pos_embed point shows what the model adds)"),
    ),
)
