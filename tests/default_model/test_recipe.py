"""The recipe that made the shipped weights: its batches, schedule, seeding and checkpoints.

The pieces run at their real sizes (batches of 16 x 128 over the 4,096-token vocabulary),
except where a test builds a tiny model to take a few optimiser steps; one test runs the whole
of stage 2 for two steps from the shipped weights.
"""

from __future__ import annotations

import itertools
import json
import math

import cloche
import pytest
import torch
import torch.nn.functional as F
from cloche.default_model import corpus, recipe, weights_dir
from cloche.default_model import tokenizer as tok_mod

SEQ, BATCH, VOCAB, HALF = recipe.SEQ, recipe.BATCH, recipe.VOCAB, recipe.SEQ // 2
TINY = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2}  # vocabulary stays VOCAB


def _noise_stream(n: int = 20_000) -> torch.Tensor:
    return torch.randint(2, VOCAB, (n,), generator=torch.Generator().manual_seed(11))


def _repeats(row: torch.Tensor, low: int = 8, high: int = HALF) -> list[tuple[int, int]]:
    """Every (start, half) with ``row[start:start+half] == row[start+half:start+2*half]``."""
    found = []
    for half in range(low, high + 1):
        run = 0
        for i, same in enumerate((row[:-half] == row[half:]).tolist()):
            run = run + 1 if same else 0
            if run >= half:
                found.append((i - half + 1, half))
    return found


# ----------------------------------------------------------------------------- batches


def test_stage1_rows_are_one_random_span_written_twice():
    rows = recipe.Rows(_noise_stream(), seed=1)
    batch = rows.fixed_repeat_batch()
    assert batch.shape == (BATCH, SEQ) and batch.dtype == torch.long
    assert torch.equal(batch[:, :HALF], batch[:, HALF:])
    assert batch.min() >= 2 and batch.max() < VOCAB, "no special ids, whole vocabulary"
    assert len({tuple(r.tolist()) for r in batch[:, :HALF]}) == BATCH, "a fresh span per row"
    assert not torch.equal(rows.fixed_repeat_batch(), batch), "a fresh batch per call"


def test_stage2_rows_repeat_a_span_of_random_length_at_a_random_offset():
    rows = recipe.Rows(_noise_stream(), seed=2)
    halves, starts = [], []
    for _ in range(4):
        batch = rows.random_repeat_batch()
        assert batch.shape == (BATCH, SEQ)
        assert batch.min() >= 2 and batch.max() < VOCAB
        for row in batch:
            found = _repeats(row)
            assert len({half for _, half in found}) == 1, "exactly one repeated span per row"
            start, half = found[0]
            assert 8 <= half <= HALF and start + 2 * half <= SEQ
            halves.append(half)
            starts.append(start)
    # the distance between the copies varies, so no fixed offset predicts the second copy
    assert len(set(halves)) >= 15 and len(set(starts)) >= 15
    assert min(halves) < 24 and max(halves) > 48


def test_code_rows_are_stream_windows_holding_a_span_at_the_planned_rate():
    stream = torch.arange(50_000) + VOCAB  # every stream id >= VOCAB: written spans stand out
    rows = recipe.Rows(stream, seed=3)
    plain = rows.code_batch(0.0)
    assert plain.shape == (BATCH, SEQ)
    for row in plain:  # one contiguous window of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + SEQ))
    assert len(set(plain[:, 0].tolist())) == BATCH, "windows start at random offsets"

    halves, starts = set(), set()
    for row in torch.cat([rows.code_batch(1.0) for _ in range(4)]):
        span = (row < VOCAB).nonzero().flatten()
        start, length = int(span[0]), len(span)
        assert torch.equal(span, torch.arange(start, start + length)), "one contiguous span"
        half = length // 2
        assert length == 2 * half and 8 <= half <= HALF
        assert torch.equal(row[start:start + half], row[start + half:start + length])
        window = (row - torch.arange(SEQ))[row >= VOCAB]
        assert len(set(window.tolist())) <= 1, "the rest of the row is still one window"
        halves.add(half)
        starts.add(start)
    assert len(halves) >= 15 and len(starts) >= 15

    quarter = torch.cat([rows.code_batch(0.25) for _ in range(20)])
    share = float((quarter < VOCAB).any(dim=1).float().mean())
    assert 0.15 < share < 0.35


# ----------------------------------------------------------------------------- schedule


def test_schedule_of_the_opening_phase():
    for stage in (1, 2):
        for progress in (0.0, 0.4, 0.9):
            plans = [recipe.plan(stage, 1, step, progress) for step in range(6)]
            assert all(p.lr == recipe.LR for p in plans), "constant learning rate"
            assert [p.synthetic for p in plans] == [True, False] * 3
            assert all(p.span_fraction == 1.0 for p in plans), "a span in every code row"


def test_schedule_after_the_switch():
    grid = [i / 20 for i in range(21)]
    lrs = [recipe.plan(2, 2, 0, progress).lr for progress in grid]
    assert lrs[0] == pytest.approx(recipe.LR) and lrs[-1] == pytest.approx(recipe.LR / 10)
    assert all(a > b for a, b in itertools.pairwise(lrs)), "cosine decay over the budget"
    assert lrs[10] == pytest.approx(recipe.LR * 0.55)
    assert recipe.plan(1, 2, 0, 0.5).lr == recipe.plan(2, 2, 0, 0.5).lr

    def synthetic_steps(stage: int, progress: float) -> list[int]:
        return [s for s in range(12) if recipe.plan(stage, 2, s, progress).synthetic]

    assert synthetic_steps(1, 0.2) == synthetic_steps(1, 0.9) == list(range(0, 12, 2))
    assert synthetic_steps(2, 0.69) == list(range(0, 12, 2))
    assert synthetic_steps(2, 0.7) == list(range(0, 12, 3)), "stage 2 thins them late"
    assert all(recipe.plan(stage, 2, 1, 0.3).span_fraction == 0.25 for stage in (1, 2))


def test_opening_ends_when_the_test_passes_from_step_200_or_at_half_budget():
    assert not recipe.leaves_opening(True, 100, 0.1), "too early even if it passes"
    assert recipe.leaves_opening(True, 200, 0.1)
    assert not recipe.leaves_opening(False, 5000, 0.5)
    assert recipe.leaves_opening(False, 100, 0.51), "half the budget spent"


def test_rows_batch_follows_the_plan():
    stream = _noise_stream()
    rows, twin = recipe.Rows(stream, seed=4), recipe.Rows(stream, seed=4)
    assert torch.equal(rows.batch(1, recipe.plan(1, 1, 0, 0.0)), twin.fixed_repeat_batch())
    assert torch.equal(rows.batch(2, recipe.plan(2, 1, 0, 0.0)), twin.random_repeat_batch())
    assert torch.equal(rows.batch(2, recipe.plan(2, 1, 1, 0.0)), twin.code_batch(1.0))
    assert torch.equal(rows.batch(1, recipe.plan(1, 2, 1, 0.9)), twin.code_batch(0.25))
    assert torch.equal(rows.batch(2, recipe.plan(2, 2, 3, 0.9)), twin.random_repeat_batch())


# ----------------------------------------------------------------------------- seeding


def test_batches_and_initial_weights_are_seeded():
    stream = _noise_stream()

    def run(seed: int) -> list[torch.Tensor]:
        rows = recipe.Rows(stream, seed)
        out = []
        for stage in (1, 2):
            for phase, progress in ((1, 0.0), (2, 0.8)):
                out += [rows.batch(stage, recipe.plan(stage, phase, s, progress)) for s in range(4)]
        return out

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))

    def init(seed: int) -> dict:
        torch.manual_seed(seed)
        return recipe.build_model(**TINY).state_dict()

    a, b, c = init(0), init(0), init(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------- model, data


def test_build_model_is_the_shipped_architecture():
    from transformers import AutoConfig

    built = recipe.build_model()
    shipped = AutoConfig.from_pretrained(str(weights_dir()))
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "pad_token_id", "attention_bias"):
        assert getattr(built.config, key) == getattr(shipped, key), key
    metrics = json.loads((weights_dir() / "metrics.json").read_text(encoding="utf-8"))
    assert sum(p.numel() for p in built.parameters()) == metrics["parameters"]
    assert VOCAB == tok_mod.VOCAB_SIZE
    assert recipe.build_model(**TINY).config.hidden_size == 16


def test_encode_stream_puts_endoftext_before_every_file():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(weights_dir() / "tokenizer.json"))
    files = [corpus.CorpusFile("a.py", "x = 1\n"), corpus.CorpusFile("b.py", "def f():\n    pass\n")]
    stream = recipe.encode_stream(files, tok)
    expected = [0, *tok.encode(files[0].text).ids, 0, *tok.encode(files[1].text).ids]
    assert stream.dtype == torch.long and stream.tolist() == expected


def test_heldout_loss_is_the_mean_next_token_loss_and_keeps_the_mode():
    torch.manual_seed(0)
    model = recipe.build_model(**TINY)
    model.train()
    rows = torch.randint(2, VOCAB, (5, 12), generator=torch.Generator().manual_seed(0))
    got = recipe.heldout_loss(model, rows, batch=2)  # uneven chunks: 2 + 2 + 1 rows
    assert model.training
    with torch.no_grad():
        logits = model.eval()(rows).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), rows[:, 1:].reshape(-1))
    assert got == pytest.approx(float(want), rel=1e-5)


# ----------------------------------------------------------------------------- checkpoints


def test_a_few_steps_write_a_checkpoint_that_transformers_and_cloche_load(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = recipe.build_model(**TINY)
    model.train()
    opt = recipe.make_optimizer(model)
    rows = recipe.Rows(_noise_stream(), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for step in range(4):  # the recipe's steps: synthetic, code, synthetic, code
        now = recipe.plan(1, 1, step, 0.0)
        batch = rows.batch(1, now)
        with torch.no_grad():
            logits = model(batch).logits
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        loss = recipe.train_step(model, opt, batch, now.lr)
        assert loss == pytest.approx(float(expected), rel=1e-5), "the loss before the update"
        assert all(g["lr"] == now.lr for g in opt.param_groups)
    assert not torch.equal(before["model.embed_tokens.weight"],
                           model.state_dict()["model.embed_tokens.weight"])
    fixed = rows.fixed_repeat_batch()
    losses = [recipe.train_step(model, opt, fixed, recipe.LR) for _ in range(6)]
    assert losses[-1] < losses[0], "steps on one batch lower its loss"

    out = tmp_path / "ckpt"
    recipe.save_checkpoint(model, out, {"steps": 3})
    recipe.save_checkpoint(model, out, {"steps": 10})  # a later save replaces the files
    for name in ("tokenizer.json", "tokenizer_config.json"):  # as train() does from --init
        (out / name).write_bytes((weights_dir() / name).read_bytes())
    assert json.loads((out / "training.json").read_text()) == {"steps": 10}
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in out.iterdir()), "world-readable"
    assert not list(tmp_path.glob(".ckpt-*")), "temporary folders are cleaned up"
    assert not list(out.glob("*.bin")), "safetensors only"

    ids = torch.randint(2, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        assert torch.allclose(plain(ids).logits, want, atol=1e-5)
    loaded = cloche.load(out)
    assert loaded.n_layers == 1 and loaded.d_vocab == VOCAB
    assert torch.allclose(loaded.run(ids).logits, want, atol=1e-5)
    assert loaded.run("def f(x):").logits.shape[-1] == VOCAB, "the tokenizer came along"


def test_stage2_runs_from_the_shipped_weights_and_checkpoints(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    records: list[dict] = []
    state = recipe.train(2, tmp_path, minutes=24 * 60, steps=2, init=weights_dir(), seed=0,
                         log=records.append)  # ended by its steps, never by its clock budget
    assert state["steps"] == 2 and state["stage"] == 2 and state["switch"] is None
    assert "manifest" in capsys.readouterr().err, "the training split is checked"
    assert json.loads((tmp_path / "training.json").read_text()) == state
    assert state["recipe"] == "cloche.default_model.recipe"
    assert [r.get("event") for r in (records[0], records[-1])] == ["start", "done"]
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the init's tokenizer, unchanged
        assert (tmp_path / name).read_bytes() == (weights_dir() / name).read_bytes()
    trained = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    shipped = AutoModelForCausalLM.from_pretrained(str(weights_dir()))
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(trained.state_dict()[w], shipped.state_dict()[w]), "it trained"
    assert math.isfinite(float(trained.state_dict()[w].sum()))
