"""The corpus split, the shipped held-out file, the manifest check, and the induction measure."""

from __future__ import annotations

import torch
from cloche.default_model import corpus
from cloche.default_model.induction import measure_induction, repeated_random_tokens


def test_split_is_deterministic_and_by_path():
    paths = [f"pkg/mod{i}.py" for i in range(400)]
    first = [corpus.is_heldout(p) for p in paths]
    assert first == [corpus.is_heldout(p) for p in paths]
    share = sum(first) / len(first)
    assert 0.5 * corpus.HELDOUT_PERCENT / 100 < share < 2 * corpus.HELDOUT_PERCENT / 100


def test_scan_excludes_tests_and_site_packages():
    files = list(corpus.scan_stdlib())
    assert files, "the running interpreter has a standard library"
    names = [f.path for f in files]
    assert names == sorted(names)
    for name in names:
        parts = name.split("/")
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), name
    assert "os.py" in names


def test_shipped_heldout_matches_split_rule():
    held = corpus.heldout_files()
    assert len(held) > 10
    assert all(corpus.is_heldout(f.path) for f in held)
    assert all(f.text for f in held)


def test_manifest_has_only_training_files_and_diff_reports_changes():
    manifest = corpus.load_manifest()
    assert manifest["files"]
    assert not any(corpus.is_heldout(p) for p in manifest["files"])
    files = [corpus.CorpusFile("a.py", "x = 1\n"), corpus.CorpusFile("b.py", "y = 2\n")]
    shipped = {"files": {"a.py": files[0].sha256, "b.py": "0" * 64, "gone.py": "0" * 64}}
    extra = [*files, corpus.CorpusFile("new.py", "z = 3\n")]
    diff = corpus.compare_manifest(extra, shipped)
    assert (diff.missing, diff.added, diff.changed) == (["gone.py"], ["new.py"], ["b.py"])
    assert not diff.identical
    assert "1 missing here" in diff.summary() and "1 changed" in diff.summary()
    same = corpus.compare_manifest(files[:1], {"files": {"a.py": files[0].sha256}})
    assert same.identical


def test_repeated_random_tokens_repeat_exactly():
    rows = repeated_random_tokens(4, 10, 50, seed=3)
    assert rows.shape == (4, 20)
    assert torch.equal(rows[:, :10], rows[:, 10:])
    assert rows.min() >= 2 and rows.max() < 50


def test_untrained_model_has_no_induction_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    result = measure_induction(model, batch=4, half=16)
    assert result.scores.shape == (2, 2)
    assert result.best[2] < 0.4
    assert result.loss_ratio > 0.5
    assert not result.passes()
