"""A sharded model streams a token file by name (every rank reopens it) like one process does
(checkpoints and exports: test_dataset_resume)."""

from __future__ import annotations

import cloche
import numpy as np
import pytest
import torch
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S
from tests.threads import TORCH_THREADS
from tests.tiny_models import VOCAB


def stats(ctx, x):
    ctx.reduce("mean", x, cloche.Mean())
    ctx.reduce("top", x[..., :4], cloche.TopK(3))


@pytest.mark.slow
def test_a_token_file_runs_sharded_as_in_one_process(tiny4_dir, tmp_path):
    directory = tiny4_dir("gpt2")
    ids = np.random.default_rng(3).integers(0, VOCAB, size=30 * 12).astype(np.uint16)
    np.save(tmp_path / "t.npy", ids)
    name = f"{tmp_path / 't.npy'}?seq_len=12"
    probes = {"embed": stats, "layers.2.resid_post": stats}
    local = cloche.load(directory)
    want = local.run_dataset(name, probes=probes, batch_size=4, progress=False)
    dist = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        got = dist.run_dataset(name, probes=probes, batch_size=4, progress=False)
    finally:
        dist.close()
    assert got["examples"] == want["examples"] == 30
    assert got["fingerprint"] == want["fingerprint"]
    for reducer, values in want["reducers"].items():
        for field, value in values.items():
            torch.testing.assert_close(got["reducers"][reducer][field], value, atol=1e-5,
                                       rtol=0)
