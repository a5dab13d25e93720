"""Architecture adapters: where each canonical probe point and weight lives in a family's modules.

An adapter is a small table, not a fork of the model code: the Hugging Face model runs its own
``forward()`` and cloche only attaches hooks at the sites named here. A family that has no
adapter still loads and still offers every module's input and output as a probe point.

Sites are given relative to the model root (``embed``, ``layers``, ...) or to one block
(``block_sites``). A site is ``(module path, "input" | "output" | "input_inplace")``:
``input_inplace`` marks an input tensor that the model also keeps for a residual add, so a
replacement must be written into the tensor itself (see ``runtime.hooks``).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Site:
    """A hook site: a module path and which of its tensors the point is."""

    module: str
    where: str  # "input" | "output" | "input_inplace"


@dataclass(frozen=True)
class WeightRule:
    """How to read one canonical weight from a raw parameter.

    ``layout`` names the transformation from the raw tensor to the canonical one (see
    ``model.weights``); ``part`` selects a slice of a fused tensor (e.g. 0/1/2 of GPT-2's c_attn).
    """

    param: str
    layout: str
    part: int | None = None


@dataclass(frozen=True)
class Adapter:
    """Everything cloche needs to know about one architecture family."""

    family: str
    model_types: tuple[str, ...]
    layers: str
    embed: str
    final_norm: str | None
    unembed: str
    logits: str
    block_sites: dict[str, Site]
    block_weights: dict[str, WeightRule]
    global_weights: dict[str, WeightRule]
    #: path of the attention module inside a block (internals via AttentionInterface)
    attention: str | None
    gated_mlp: bool = False
    causal: bool = True
    notes: tuple[str, ...] = field(default=())


GPT2 = Adapter(
    family="gpt2",
    model_types=("gpt2",),
    layers="transformer.h",
    embed="transformer.wte",
    final_norm="transformer.ln_f",
    unembed="lm_head",
    logits="lm_head",
    attention="attn",
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("ln_1", "output"),
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

_LLAMA_BLOCK_SITES = {
    "resid_pre": Site("", "input"),
    "ln1": Site("input_layernorm", "output"),
    "attn.out": Site("self_attn", "output"),
    "resid_mid": Site("post_attention_layernorm", "input_inplace"),
    "ln2": Site("post_attention_layernorm", "output"),
    "mlp.pre": Site("mlp.gate_proj", "output"),
    "mlp.pre_linear": Site("mlp.up_proj", "output"),
    "mlp.post": Site("mlp.down_proj", "input"),
    "mlp.out": Site("mlp", "output"),
    "resid_post": Site("", "output"),
}

_LLAMA_BLOCK_WEIGHTS = {
    "attn.W_Q": WeightRule("self_attn.q_proj.weight", "linear_heads_in"),
    "attn.W_K": WeightRule("self_attn.k_proj.weight", "linear_kv_heads_in"),
    "attn.W_V": WeightRule("self_attn.v_proj.weight", "linear_kv_heads_in"),
    "attn.b_Q": WeightRule("self_attn.q_proj.bias", "bias_heads"),
    "attn.b_K": WeightRule("self_attn.k_proj.bias", "bias_kv_heads"),
    "attn.b_V": WeightRule("self_attn.v_proj.bias", "bias_kv_heads"),
    "attn.W_O": WeightRule("self_attn.o_proj.weight", "linear_heads_out"),
    "attn.b_O": WeightRule("self_attn.o_proj.bias", "identity"),
    "mlp.W_in": WeightRule("mlp.up_proj.weight", "linear_in_out"),
    "mlp.W_gate": WeightRule("mlp.gate_proj.weight", "linear_in_out"),
    "mlp.W_out": WeightRule("mlp.down_proj.weight", "linear_in_out"),
    "ln1.w": WeightRule("input_layernorm.weight", "identity"),
    "ln2.w": WeightRule("post_attention_layernorm.weight", "identity"),
}

LLAMA = Adapter(
    family="llama",
    model_types=("llama", "mistral", "qwen2"),
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    unembed="lm_head",
    logits="lm_head",
    attention="self_attn",
    gated_mlp=True,
    block_sites=_LLAMA_BLOCK_SITES,
    block_weights=_LLAMA_BLOCK_WEIGHTS,
    global_weights={
        "embed.W_E": WeightRule("model.embed_tokens.weight", "identity"),
        "ln_final.w": WeightRule("model.norm.weight", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
    notes=("attn.q and attn.k are after the rotary embedding: the values attention really uses",),
)

GPT_NEOX = Adapter(
    family="gpt_neox",
    model_types=("gpt_neox",),
    layers="gpt_neox.layers",
    embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm",
    unembed="lm_head",
    logits="lm_head",
    attention="attention",
    block_sites={
        "resid_pre": Site("", "input"),
        "ln1": Site("input_layernorm", "output"),
        "attn.out": Site("attention", "output"),
        # resid_mid exists only without the parallel residual; see points.build_catalog
        "resid_mid": Site("post_attention_layernorm", "input_inplace"),
        "ln2": Site("post_attention_layernorm", "output"),
        "mlp.pre": Site("mlp.dense_h_to_4h", "output"),
        "mlp.post": Site("mlp.dense_4h_to_h", "input"),
        "mlp.out": Site("mlp", "output"),
        "resid_post": Site("", "output"),
    },
    block_weights={
        "attn.W_Q": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 0),
        "attn.W_K": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 1),
        "attn.W_V": WeightRule("attention.query_key_value.weight", "neox_qkv_heads", 2),
        "attn.b_Q": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 0),
        "attn.b_K": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 1),
        "attn.b_V": WeightRule("attention.query_key_value.bias", "neox_qkv_bias_heads", 2),
        "attn.W_O": WeightRule("attention.dense.weight", "linear_heads_out"),
        "attn.b_O": WeightRule("attention.dense.bias", "identity"),
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
        "embed.W_E": WeightRule("gpt_neox.embed_in.weight", "identity"),
        "ln_final.w": WeightRule("gpt_neox.final_layer_norm.weight", "identity"),
        "ln_final.b": WeightRule("gpt_neox.final_layer_norm.bias", "identity"),
        "unembed.W_U": WeightRule("lm_head.weight", "linear_in_out"),
    },
)

BERT = Adapter(
    family="bert",
    model_types=("bert",),
    layers="bert.encoder.layer",
    embed="bert.embeddings.word_embeddings",
    final_norm=None,
    unembed="cls.predictions.decoder",
    logits="cls",
    attention="attention.self",
    causal=False,
    block_sites={
        "resid_pre": Site("", "input"),
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

ADAPTERS: tuple[Adapter, ...] = (GPT2, LLAMA, GPT_NEOX, BERT)


def adapter_for(model_type: str | None) -> Adapter | None:
    """The adapter for a Hugging Face ``config.model_type``, or None for an unknown family."""
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    return None
