"""A sharded model's save contexts survive a restart of the whole group (``--state-dir``):
every rank journals its part, and entries written on several ranks keep single-process order."""

from __future__ import annotations

import cloche
import torch
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch


def tag(ctx, x):  # the same key from a point on each rank: order must interleave correctly
    ctx.save("seen", x[:, 0, :2])
    ctx.reduce("mean", x, cloche.Mean())


POINTS = {"layers.0.resid_post": tag, "layers.3.resid_post": tag}


def test_a_restarted_group_finds_every_ranks_contexts(tiny4_dir, tmp_path):
    directory = tiny4_dir("gpt2")
    local = cloche.load(directory)
    for seed in (1, 2, 3):
        local.run(ids_batch(seed=seed), probes=POINTS, save="kept")
    want = local.save_context("kept")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        assert {model.owner_of(p) for p in POINTS} == {0, 1}
        for seed in (1, 2, 3):
            model.run(ids_batch(seed=seed), probes=POINTS, save="kept")
    finally:
        model.close()
    again = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        got = again.save_context("kept")
        assert got.num_runs == 3
        torch.testing.assert_close(got.fetch("seen"), want.fetch("seen"), atol=1e-5, rtol=0)
        torch.testing.assert_close(got.result("mean")["mean"], want.result("mean")["mean"],
                                   atol=1e-5, rtol=0)
        # new runs continue the order after the old ones
        again.run(ids_batch(seed=4), probes=POINTS, save="kept")
        local.run(ids_batch(seed=4), probes=POINTS, save="kept")
        torch.testing.assert_close(got.fetch("seen"), want.fetch("seen"), atol=1e-5, rtol=0)
    finally:
        again.close()
