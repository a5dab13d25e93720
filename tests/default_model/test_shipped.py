"""The shipped default model: loads with plain transformers, matches its card, has induction.

Everything here goes through plain ``transformers`` (``AutoModelForCausalLM``,
``AutoTokenizer``, ``attn_implementation="eager"``, ``output_attentions=True``) so that the
checks do not depend on cloche's own loading code.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cloche import data
from cloche.default_model import weights_dir

CARD = Path(__file__).resolve().parents[2] / "docs" / "default-model.md"


@pytest.fixture(scope="module")
def metrics() -> dict:
    return json.loads((weights_dir() / "metrics.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(weights_dir()), attn_implementation="eager")
    return m.eval()


def test_files_are_plain_hugging_face_format():
    directory = weights_dir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (directory / name).is_file(), name
    assert (directory / "model.safetensors").stat().st_size <= 25 * 2**20
    assert not list(directory.glob("*.bin")), "weights must be safetensors only"


def test_model_and_tokenizer_load_with_plain_transformers(model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(weights_dir()))
    assert model.config.model_type == "llama"
    assert model.config.num_hidden_layers >= 2
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (0, 0, 1)
    assert len(tok) == model.config.vocab_size
    text = "def square(x):\n    return x * x\n"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)


def test_heldout_loss_matches_model_card(model, metrics):
    heldout = data.default("heldout")
    assert heldout.fingerprint() == metrics["heldout_fingerprint"]
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in heldout.batches(128):
            logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
            targets = batch.tokens[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
            total += float(
                F.cross_entropy(
                    logits[:, :-1].transpose(1, 2), targets, ignore_index=-100, reduction="sum"
                )
            )
            count += int((targets != -100).sum())
    ce = total / count
    assert count == metrics["heldout_targets"]
    assert ce == pytest.approx(metrics["heldout_ce"], rel=0.01)
    card = CARD.read_text(encoding="utf-8")
    rows = [line for line in card.splitlines() if line.startswith("| held-out cross-entropy")]
    assert rows, "the model card quotes the held-out cross-entropy"
    quoted = float(rows[0].rstrip(" |").rsplit("|", 1)[1])
    assert quoted == pytest.approx(ce, rel=0.01)


def test_beats_bigram_by_twenty_percent(metrics):
    assert metrics["heldout_ce"] <= 0.8 * metrics["bigram_ce"]


def _induction(model, half: int, seed: int) -> tuple[torch.Tensor, float, float]:
    """Per-head attention to t - half + 1, and first/repeated-half losses (issue's definition)."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(2, model.config.vocab_size, (24, half), generator=gen)
    tokens = torch.cat([first, first], dim=1)
    with torch.no_grad():
        out = model(tokens, output_attentions=True)
    queries = torch.arange(half, 2 * half)
    scores = torch.stack(
        [a[:, :, queries, queries - half + 1].mean(dim=(0, 2)) for a in out.attentions]
    )
    losses = F.cross_entropy(out.logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    return scores, float(losses[:, : half - 1].mean()), float(losses[:, half:].mean())


def test_has_an_induction_head(model, metrics):
    scores, first_half, repeated_half = _induction(model, 64, seed=2024)
    assert float(scores.max()) >= 0.4
    layer, head = metrics["induction_layer"], metrics["induction_head"]
    assert float(scores[layer, head]) >= 0.4
    assert repeated_half <= 0.5 * first_half


def test_induction_head_matches_content_not_a_fixed_offset(model, metrics):
    """At another repeat length the same head still finds the earlier occurrence.

    A head that always attends 63 positions back passes the test above (which repeats after
    exactly 64 tokens) without matching any content; at length 48 it would fail.
    """
    scores, first_half, repeated_half = _induction(model, 48, seed=7)
    layer, head = metrics["induction_layer"], metrics["induction_head"]
    assert float(scores[layer, head]) >= 0.4
    assert repeated_half <= 0.5 * first_half
