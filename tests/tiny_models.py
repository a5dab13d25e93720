"""Tiny real Hugging Face models built from configs and saved with save_pretrained.

Tests load them back through the real loading path (``cloche.load`` / ``from_pretrained``).
"""

from __future__ import annotations

import pathlib

import torch
import transformers

VOCAB = 101
_COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}


def _configs(n_layers: int = 2) -> dict[str, tuple[type, transformers.PretrainedConfig]]:
    t = transformers
    return {
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(
            n_layer=n_layers, n_embd=32, n_head=4, n_positions=64, **_COMMON)),
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **_COMMON)),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **_COMMON)),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **_COMMON)),
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            max_position_embeddings=64, **_COMMON)),
        "gpt_neox_sequential": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            max_position_embeddings=64, use_parallel_residual=False, **_COMMON)),
        "bert": (t.BertForMaskedLM, t.BertConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            max_position_embeddings=64, **_COMMON)),
        "opt": (t.OPTForCausalLM, t.OPTConfig(
            hidden_size=32, ffn_dim=64, num_hidden_layers=n_layers, num_attention_heads=4,
            word_embed_proj_dim=32, max_position_embeddings=64, **_COMMON)),
        "gptj": (t.GPTJForCausalLM, t.GPTJConfig(
            n_embd=32, n_inner=64, n_layer=n_layers, n_head=4, n_positions=64, rotary_dim=4, **_COMMON)),
        # a global then a local layer; the window (4) is shorter than the test inputs (9)
        "gpt_neo": (t.GPTNeoForCausalLM, t.GPTNeoConfig(
            hidden_size=32, intermediate_size=64, num_layers=n_layers, num_heads=4,
            attention_types=[[["global", "local"], n_layers // 2]], window_size=4,
            max_position_embeddings=64, **_COMMON)),
        "phi": (t.PhiForCausalLM, t.PhiConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            partial_rotary_factor=0.5, max_position_embeddings=64, **_COMMON)),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_COMMON)),
        # weights large enough (initializer_range) and caps small enough that the soft-capping
        # changes scores and logits; layer 0 slides over 4 tokens
        "gemma2": (t.Gemma2ForCausalLM, t.Gemma2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
            attn_logit_softcapping=1.5, final_logit_softcapping=2.0, initializer_range=0.3,
            max_position_embeddings=64, **_COMMON)),
        "gemma3": (t.Gemma3ForCausalLM, t.Gemma3TextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (n_layers // 2), max_position_embeddings=64,
            **_COMMON)),
        "qwen3": (t.Qwen3ForCausalLM, t.Qwen3Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_COMMON)),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **_COMMON)),
        "olmo2": (t.Olmo2ForCausalLM, t.Olmo2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, **_COMMON)),
        "stablelm": (t.StableLmForCausalLM, t.StableLmConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, partial_rotary_factor=0.5, qk_layernorm=True,
            max_position_embeddings=64, **_COMMON)),
        "stablelm_parallel": (t.StableLmForCausalLM, t.StableLmConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=4, partial_rotary_factor=0.5, use_parallel_residual=True,
            max_position_embeddings=64, **_COMMON)),
        "starcoder2": (t.Starcoder2ForCausalLM, t.Starcoder2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=4, max_position_embeddings=64, **_COMMON)),
        "roberta": (t.RobertaForMaskedLM, t.RobertaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            max_position_embeddings=64, **_COMMON)),
        "mixtral": (t.MixtralForCausalLM, t.MixtralConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, **_COMMON)),
        # layer 0 dense (mlp_only_layers), layer 1 sparse with a shared expert
        "qwen2_moe": (t.Qwen2MoeForCausalLM, t.Qwen2MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            shared_expert_intermediate_size=32, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
            max_position_embeddings=64, **_COMMON)),
        # Falcon-7B style: parallel attention and MLP off one LayerNorm, multi-query, rotary
        "falcon": (t.FalconForCausalLM, t.FalconConfig(
            hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, multi_query=True,
            parallel_attn=True, bias=False, **_COMMON)),
        # Falcon-40B style: two LayerNorms (ln_attn, ln_mlp), grouped-query
        "falcon_new": (t.FalconForCausalLM, t.FalconConfig(
            hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True, parallel_attn=True, **_COMMON)),
        # Falcon-RW style: sequential blocks with ALiBi
        "falcon_rw": (t.FalconForCausalLM, t.FalconConfig(
            hidden_size=32, num_hidden_layers=n_layers, num_attention_heads=4, multi_query=False,
            parallel_attn=False, alibi=True, bias=True, **_COMMON)),
        "bloom": (t.BloomForCausalLM, t.BloomConfig(
            hidden_size=32, n_layer=n_layers, n_head=4, **_COMMON)),
        "olmo": (t.OlmoForCausalLM, t.OlmoConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, clip_qkv=0.5, max_position_embeddings=64, **_COMMON)),
        "olmoe": (t.OlmoeForCausalLM, t.OlmoeConfig(
            hidden_size=32, intermediate_size=16, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64, **_COMMON)),
        "qwen3_moe": (t.Qwen3MoeForCausalLM, t.Qwen3MoeConfig(
            hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
            num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
            **_COMMON)),
        "cohere": (t.CohereForCausalLM, t.CohereConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers, num_attention_heads=4,
            num_key_value_heads=2, use_qk_norm=True, logit_scale=0.5,
            max_position_embeddings=64, **_COMMON)),
    }


FAMILIES = tuple(_configs())
CAUSAL = tuple(f for f in FAMILIES if f not in ("bert", "roberta"))
MOE = ("mixtral", "qwen2_moe", "olmoe", "qwen3_moe")


def save_tiny(family: str, directory: pathlib.Path, seed: int = 0, n_layers: int = 2
              ) -> pathlib.Path:
    """Build the tiny ``family`` model (``n_layers`` blocks, even) with random weights and save
    it to ``directory``."""
    cls, config = _configs(n_layers)[family]
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # random, non-trivial norms and biases so that mistakes show
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory
