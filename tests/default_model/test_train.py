"""Pieces of the training recipe: the batch mix, the schedule, the model, the checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cloche.default_model import train
from cloche.default_model.train import Batcher, TrainConfig


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = {"hidden": 16, "heads": 2, "layers": 2, "batch_size": 4, "vocab_size": 64}
    return TrainConfig(out=tmp_path, **{**base, **kw})


def _has_repeat(row: torch.Tensor, min_len: int) -> bool:
    """Whether some span of ``min_len`` tokens occurs twice, back to back."""
    n = len(row)
    for length in range(min_len, n // 2 + 1):
        for start in range(n - 2 * length + 1):
            if torch.equal(row[start : start + length], row[start + length : start + 2 * length]):
                return True
    return False


def test_batches_are_seeded(tmp_path):
    stream = torch.arange(1000) % 60 + 2
    a = Batcher(stream, _cfg(tmp_path))
    b = Batcher(stream, _cfg(tmp_path))
    for step in range(4):
        assert torch.equal(a.batch(1, step), b.batch(1, step))
        assert torch.equal(a.batch(2, step), b.batch(2, step))


def test_opening_alternates_code_and_synthetic(tmp_path):
    stream = torch.arange(1000) % 60 + 2
    cfg = _cfg(tmp_path, seq_len=32, synthetic_len_start=16, opening_code_every=2)
    batcher = Batcher(stream, cfg)
    code = batcher.batch(1, 0)
    assert code.shape == (4, 32)
    synthetic = batcher.batch(1, 1)
    assert synthetic.shape == (8, 16)  # same number of tokens, shorter rows
    assert synthetic.min() >= train.N_SPECIAL
    assert all(_has_repeat(row, 2) for row in synthetic)
    batcher.grow()
    assert batcher.synthetic_len == 32 and batcher.curriculum_done
    assert batcher.batch(1, 1).shape == (4, 32)


def test_code_phase_repeat_fraction(tmp_path):
    stream = torch.arange(5000) % 60 + 2  # never repeats within 32 tokens by itself
    cfg = _cfg(tmp_path, seq_len=32, batch_size=200, repeat_fraction=0.25)
    rows = Batcher(stream, cfg).batch(2, 0)
    share = sum(_has_repeat(row, 4) for row in rows) / len(rows)
    assert 0.12 < share < 0.4


def test_schedule_warms_up_then_decays(tmp_path):
    cfg = _cfg(tmp_path, lr=1e-3, warmup=10, steps=100, min_lr_ratio=0.1)
    lrs = [train._lr_at(s, cfg) for s in range(100)]
    assert lrs[0] < lrs[9] == max(lrs)
    assert lrs[-1] < lrs[50] < lrs[10]
    assert min(lrs[10:]) >= 1e-4 - 1e-12
    timed = _cfg(tmp_path, lr=1e-3, warmup=10, steps=100, max_minutes=1.0)
    assert train._lr_at(20, timed, elapsed_s=60.0) == 1e-3 * 0.1


def test_model_and_checkpoint_load_with_plain_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path / "out", layers=3)
    model = train.build_model(cfg)
    assert model.config.tie_word_embeddings and model.config.attention_bias
    assert model.config.num_hidden_layers == 3
    train.save_checkpoint(model, cfg.out, {"steps_done": 0})
    loaded = AutoModelForCausalLM.from_pretrained(str(cfg.out))
    x = torch.randint(2, 64, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(x).logits, loaded(x).logits, atol=1e-6)
    assert (cfg.out / "training.json").is_file()
    assert all(p.stat().st_mode & 0o044 == 0o044 for p in cfg.out.iterdir()), "world-readable"
    assert not list(cfg.out.parent.glob(".ckpt-*")), "temporary folders are cleaned up"
