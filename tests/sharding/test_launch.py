"""``serve_distributed`` — what ``cloche serve --world-size N`` calls — end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _serve(directory: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.sharding.launch_job", str(directory), mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_serve_returns_zero_after_serving(tiny4_dir):
    done = _serve(tiny4_dir("gpt2"), "ok")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served ok" in done.stdout


def test_a_lost_rank_ends_the_server_with_code_3_and_a_clear_message(tiny4_dir):
    done = _serve(tiny4_dir("gpt2"), "lose")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "client saw WorkerLost: rank 1 died" in done.stdout
    assert "cloche serve: rank 1 died" in done.stderr
    assert "shutting down (exit code 3)" in done.stderr


def test_a_group_that_fails_to_start_leaves_nothing_behind(tiny4_dir, tmp_path):
    # a model whose structure cannot be found (an encoder-decoder) cannot be sharded by layers:
    # the start fails after the workers were spawned, and the next group of this same process
    # (a notebook trying again) must still start
    import cloche
    import pytest
    import torch
    import transformers
    from cloche.sharding.launch import start_local

    from tests.sharding.conftest import TIMEOUT_S, ids_batch
    from tests.threads import TORCH_THREADS

    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                   vocab_size=101, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5Model(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(cloche.UsageError, match="could not be discovered"):
        start_local(tmp_path / "t5", 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    model = start_local(tiny4_dir("gpt2"), 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        batch = ids_batch(seed=3)
        assert torch.equal(model.run(batch).logits, cloche.load(tiny4_dir("gpt2")).run(batch).logits)
    finally:
        model.close()


def test_the_shipped_model_has_one_name_everywhere():
    import cloche
    from cloche.default_model import weights_dir
    from cloche.sharding.launch import start_local

    from tests.sharding.conftest import TIMEOUT_S
    from tests.threads import TORCH_THREADS

    assert cloche.load().name == "cloche-default"
    assert cloche.load(weights_dir()).name == "cloche-default"
    sharded = start_local(weights_dir(), 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        assert sharded.name == "cloche-default" and sharded.info()["name"] == "cloche-default"
    finally:
        sharded.close()
