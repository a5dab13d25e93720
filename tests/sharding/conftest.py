"""Fixtures for the multi-rank tests: tiny 4-block models and real gloo groups on this machine.

Rank 0 runs in the test process; the other ranks are ``python -m cloche.sharding.worker``
subprocesses (the torchrun entry point). Groups are module-scoped and torn down between
configurations (a process holds one process group at a time).
"""

from __future__ import annotations

import pathlib

import pytest
import torch
import transformers

from tests.tiny_models import _COMMON, VOCAB

N_LAYERS = 4
TIMEOUT_S = 5.0  # the fault bound the groups run with (default is 60 s)


def save_tiny4(family: str, directory: pathlib.Path, seed: int = 0,
               n_layers: int = N_LAYERS) -> pathlib.Path:
    """A tiny 4-block model (so 3 ranks each get a block) with non-trivial norms; ``n_layers``
    blocks where a test needs more ranks."""
    t = transformers
    if family == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(n_layer=n_layers, n_embd=32, n_head=4,
                                               n_positions=64, **_COMMON))
    elif family == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **_COMMON))
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = type(model)(model.config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith(("ln_1.weight", "ln_2.weight",
                                                        "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny4_dir(tmp_path_factory):
    made: dict[str, pathlib.Path] = {}

    def make(family: str) -> pathlib.Path:
        if family not in made:
            made[family] = save_tiny4(family, tmp_path_factory.mktemp(f"{family}4"))
        return made[family]

    return make


def ids_batch(seed: int = 1, batch: int = 3, seq: int = 10) -> dict[str, torch.Tensor]:
    """Token ids with a left-padded row, so masks and position ids are exercised."""
    ids = torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = _COMMON["pad_token_id"]
    return {"input_ids": ids, "attention_mask": mask}
