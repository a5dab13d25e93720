"""The shipped model's recipe runs (a couple of steps, from the shipped weights)."""

from __future__ import annotations

import json

from cloche.default_model import recipe, weights_dir


def test_recipe_stage2_runs_and_checkpoints(tmp_path):
    records = []
    state = recipe.train(2, tmp_path, minutes=24 * 60, steps=2, init=weights_dir(), seed=0,
                         log=records.append)  # ended by its steps, never by its clock budget
    assert state["steps"] == 2 and state["stage"] == 2
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "training.json").read_text())["recipe"] == "cloche.default_model.recipe"
    assert records[0]["event"] == "start" and records[-1]["event"] == "done"


def test_rows_repeat_a_span_at_a_random_offset():
    import torch

    rows = recipe.Rows(torch.arange(10_000) % 4096, seed=3)
    batch = rows.random_repeat_batch()
    assert batch.shape == (recipe.BATCH, recipe.SEQ)
    for row in batch:  # some span of length >= 8 occurs twice back to back
        found = any(torch.equal(row[s:s + h], row[s + h:s + 2 * h])
                    for h in range(8, 65) for s in range(recipe.SEQ - 2 * h + 1))
        assert found
