"""``cloche check --world-size 2``: the sharded model against one process, on every point."""

from __future__ import annotations

from cloche.check import PASS, check

from tests.threads import TORCH_THREADS
from tests.tiny_models import save_tiny


def test_two_ranks_agree_with_one_process(tmp_path):
    directory = save_tiny("llama", tmp_path / "llama4", n_layers=4)
    report = check(directory, world_size=2, threads=TORCH_THREADS)
    assert report.ok, report.table()
    sharded = [row for row in report.rows if row.check.startswith("sharded (2 ranks)")]
    assert [row.check.split(": ")[1] for row in sharded] == ["every point", "logits", "gradients"]
    assert all(row.status == PASS for row in sharded)
    assert sharded[0].points.endswith("on ranks [0, 1]") and sharded[0].n_points > 40


def test_more_ranks_than_layers_is_a_skip_not_a_launch(tiny_dir):
    report = check(tiny_dir("gpt2"), world_size=3)
    row = report.rows[-1]
    assert row.status == "SKIP" and "exceeds the model's 2 layers" in row.reason
