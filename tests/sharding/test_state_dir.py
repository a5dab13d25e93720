"""A sharded model's save contexts survive a restart of the whole group (``--state-dir``):
every rank journals its part, and entries written on several ranks keep single-process order."""

from __future__ import annotations

import cloche
import pytest
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


def per_rank(shard, name):
    """On each rank: its own part of context ``name`` (runs, entries per key)."""
    if name not in shard.save_contexts():
        return None
    handle = shard.save_context(name)
    return handle.num_runs, {k: len(handle.fetch(k, "list")) for k in sorted(handle.keys())}


class RankZeroCrashed(Exception):
    """Stands for rank 0 dying between the workers' commits and its own."""


def test_a_run_that_lost_a_rank_is_on_no_rank_after_a_restart(tiny4_dir, tmp_path):
    directory = tiny4_dir("gpt2")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        model.run(ids_batch(seed=1), probes=POINTS, save="c")
        executor = model.executor
        original = executor._settle

        def rank_1_dies_after_voting(seq, txn, ok):
            executor.group.processes[1].kill()
            executor.group.processes[1].wait()
            return original(seq, txn, ok)

        executor._settle = rank_1_dies_after_voting
        with pytest.raises(cloche.WorkerLost) as lost:
            model.run(ids_batch(seed=2), probes=POINTS, save="c")
        assert lost.value.rank == 1
    finally:
        model.close()
    again = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        assert again.call(per_rank, "c", rank="all") == {0: (1, {"seen": 1}),
                                                         1: (1, {"seen": 1})}
        assert again.save_context("c").num_runs == 1
    finally:
        again.close()


def test_a_commit_rank_0_never_recorded_is_taken_back_on_restart(tiny4_dir, tmp_path):
    directory = tiny4_dir("gpt2")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        model.run(ids_batch(seed=1), probes=POINTS, save="c")
        model.run(ids_batch(seed=1), probes={"layers.3.resid_post": tag}, save="only-rank-1")

        def crash(seq, ok):  # rank 1 has committed run 2; rank 0 dies before it does
            raise RankZeroCrashed

        model.executor._stage.settle = crash
        with pytest.raises(RankZeroCrashed):
            model.run(ids_batch(seed=2), probes=POINTS, save="c")
        assert model.call(per_rank, "c", rank=1) == (2, {"seen": 2})  # the doubt is real
    finally:
        model.close()
    again = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1, state_dir=tmp_path)
    try:
        assert again.call(per_rank, "c", rank="all") == {0: (1, {"seen": 1}),
                                                         1: (1, {"seen": 1})}
        assert again.call(per_rank, "only-rank-1", rank=1) == (1, {"seen": 1})
        again.run(ids_batch(seed=3), probes=POINTS, save="c")  # and it goes on from there
        assert again.call(per_rank, "c", rank="all") == {0: (2, {"seen": 2}),
                                                         1: (2, {"seen": 2})}
    finally:
        again.close()
