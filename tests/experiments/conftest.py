"""The ``model`` fixture every experiment test runs against (one place to add more kinds).

Kinds: ``tiny-gpt2`` (tests/conftest.py's tiny GPT-2, no tokenizer), ``tiny-llama`` (a tiny
Llama with a character-level tokenizer saved beside it, so text paths are exercised too) and
``default`` (the shipped default model, skipped until its weights exist), ``remote`` (the
tiny Llama served by a real server on 127.0.0.1, through ``connect``) and ``sharded`` (the tiny
Llama over a world-size-2 gloo group). Every test module runs against each kind.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

import cloche
import pytest
import torch
import transformers
from cloche.default_model import weights_dir

from tests.threads import TORCH_THREADS

KINDS = ["tiny-gpt2", "tiny-llama", "default", "remote", "sharded"]


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Every printable ASCII character is one token; ids 0/1/2 are eos/pad/unk."""
    from tokenizers import Tokenizer, decoders, models

    chars = sorted(set(string.printable))
    vocab = {"<eos>": 0, "<pad>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", bos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=64)


def save_tiny_llama(directory: Path) -> Path:
    tok = char_tokenizer()
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, vocab_size=len(tok),
        bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def default_dir() -> Path:
    """The shipped weights, or a checkpoint named by $CLOCHE_TEST_DEFAULT_MODEL (for trying
    the tests on an intermediate checkpoint before the final weights land)."""
    override = os.environ.get("CLOCHE_TEST_DEFAULT_MODEL")
    return Path(override) if override else weights_dir()


def default_available() -> bool:
    return (default_dir() / "config.json").exists()


@pytest.fixture(scope="package")
def local_models(tiny_model, tmp_path_factory):
    """kind -> a cloche model (local, remote or sharded), made once for this package.

    Torn down when the package's tests are done: a process holds one process group at a time,
    and the sharding tests that run later start groups of their own.
    """
    loaded: dict[str, object] = {}
    cleanup: list = []
    llama_dir: list[Path] = []

    def tiny_llama_dir() -> Path:
        if not llama_dir:
            llama_dir.append(save_tiny_llama(tmp_path_factory.mktemp("llama-tok")))
        return llama_dir[0]

    def get(kind: str):
        if kind not in loaded:
            if kind == "tiny-gpt2":
                loaded[kind] = tiny_model("gpt2")
            elif kind == "tiny-llama":
                loaded[kind] = cloche.load(tiny_llama_dir())
            elif kind == "default":
                assert default_available(), f"no default model weights in {default_dir()}"
                loaded[kind] = cloche.load(default_dir())
            elif kind == "remote":  # the tiny Llama behind a real server on 127.0.0.1
                from cloche.client import connect
                from cloche.server.app import Server
                from cloche.server.config import ServerConfig

                server = Server(cloche.load(tiny_llama_dir()),
                                ServerConfig(token="experiments-token", port=0))
                host, port = server.start()
                cleanup.append(server.shutdown)
                loaded[kind] = connect(f"{host}:{port}", token="experiments-token")
                cleanup.append(loaded[kind].close)
            elif kind == "sharded":  # the tiny Llama over two gloo ranks, one layer each
                from cloche.sharding import start_local

                loaded[kind] = start_local(tiny_llama_dir(), 2, timeout_s=30.0,
                                           threads=TORCH_THREADS)
                cleanup.append(loaded[kind].close)
            else:
                raise ValueError(kind)
        return loaded[kind]

    yield get
    for close in reversed(cleanup):
        close()


def _leftover_scratch(model) -> list[str]:
    return [n for n in model.save_contexts() if n.startswith("exp/")]


@pytest.fixture(params=KINDS)
def model(request, local_models):
    """Each experiment test runs once per model kind; scratch contexts must all be cleared."""
    m = local_models(request.param)
    yield m
    assert _leftover_scratch(m) == []


@pytest.fixture
def default_model(local_models):
    m = local_models("default")
    yield m
    assert _leftover_scratch(m) == []
