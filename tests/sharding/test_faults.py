"""Lost ranks and cancellation: errors within the bound, nothing hangs, state stays consistent."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import cloche
from cloche.data import Dataset
from cloche.sharding.launch import start_local
from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.tiny_models import VOCAB

SLACK_S = 10.0  # scheduling slack on a busy machine, on top of the configured bound


def slow(ctx, x):
    time.sleep(0.3)


def test_killed_rank_raises_worker_lost_naming_it(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 3, timeout_s=TIMEOUT_S, threads=1)
    try:
        assert model.executor.ping_ranks() == [0, 1, 2]
        victim = model.executor.group.processes[2]
        threading.Timer(0.5, victim.kill).start()
        started = time.monotonic()
        with pytest.raises(cloche.WorkerLost) as info:
            for _ in range(100):  # runs in progress when the rank dies
                model.run(ids_batch(), probes={"layers.3.mlp.out": slow})
        assert info.value.rank == 2
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
        with pytest.raises(cloche.WorkerLost):
            model.run(ids_batch())
        codes = model.executor.group.wait(timeout_s=TIMEOUT_S + SLACK_S)
        assert codes[1] == 3  # the surviving worker noticed and exited with the documented code
    finally:
        model.close()


def test_hung_rank_is_detected_by_heartbeat(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 2, timeout_s=TIMEOUT_S, threads=1)
    victim = model.executor.group.processes[1]
    try:
        model.run(ids_batch())
        os.kill(victim.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(cloche.WorkerLost) as info:
            model.run(ids_batch())
        assert info.value.rank == 1
        assert "heartbeat" in str(info.value)
        assert time.monotonic() - started < TIMEOUT_S + SLACK_S
    finally:
        victim.kill()
        model.close()


def _dataset(n: int = 40) -> Dataset:
    g = torch.Generator().manual_seed(9)
    return Dataset([torch.randint(3, VOCAB, (8,), generator=g).tolist() for _ in range(n)],
                   name="cancel", seq_len=8, pad_id=2)


def _stats(ctx, x):
    ctx.reduce("mean", x, cloche.Mean())


def _slow_stats(ctx, x):
    time.sleep(0.05)
    ctx.reduce("mean_last", x, cloche.Mean())


@pytest.fixture(scope="module")
def group2(tiny4_dir):
    directory = tiny4_dir("gpt2")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=1)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()


def test_cancel_during_dataset_run_then_normal_run(group2):
    local, model = group2
    probes = {"layers.0.resid_post": _stats, "layers.3.resid_post": _slow_stats}
    try:
        cancel = threading.Event()
        seen = []

        def progress(update):
            seen.append(update["done"])
            if update["done"] >= 6:
                cancel.set()

        with pytest.raises(cloche.Cancelled):
            model.run_dataset(_dataset(), probes=probes, save="c", batch_size=2,
                              progress=progress, cancel=cancel)
        assert seen and seen[-1] < 40
        assert model.save_context("c").reducers() == {}
        assert model.save_context("c").num_runs == 0
        got = model.run_dataset(_dataset(), probes=probes, save="c", batch_size=2)
        want = local.run_dataset(_dataset(), probes=probes, save="c", batch_size=2)
        for name in ("mean", "mean_last"):
            torch.testing.assert_close(got["reducers"][name]["mean"],
                                       want["reducers"][name]["mean"], atol=1e-5, rtol=0)
        torch.testing.assert_close(model.run(ids_batch()).logits, local.run(ids_batch()).logits,
                                   atol=1e-5, rtol=0)
    finally:
        model.save_context("c").clear()


def test_cancel_mid_run_reaches_every_rank(group2):
    local, model = group2
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        started = time.monotonic()
        with pytest.raises(cloche.Cancelled):
            model.run(ids_batch(), probes={f"layers.{i}.mlp.out": slow for i in (1, 2, 3)},
                      save="mid", cancel=cancel)
        assert time.monotonic() - started < 0.3 * 3 + SLACK_S
        assert model.save_context("mid").keys() == []
        assert model.executor.ping_ranks() == [0, 1]
        torch.testing.assert_close(model.run(ids_batch()).logits, local.run(ids_batch()).logits,
                                   atol=1e-5, rtol=0)
    finally:
        model.save_context("mid").clear()


def test_reads_are_answered_while_a_dataset_run_is_in_progress(group2):
    local, model = group2
    model.save_context("before").clear()
    model.run(ids_batch(), probes={"layers.3.mlp.out": lambda c, x: c.save("x", x)},
              save="before")
    done = threading.Event()
    errors = []

    def long_run():
        try:
            model.run_dataset(_dataset(), probes={"layers.3.resid_post": _slow_stats},
                              save="long", batch_size=1)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=long_run)
    worker.start()
    try:
        time.sleep(0.5)
        saved = model.save_context("before").fetch("x")  # held by rank 1, busy with the run
        weight = model.param("layers.3.mlp.W_in")
        names = model.save_contexts()
        assert not done.is_set()  # all three were answered while the run was still going
        assert saved.shape[0] == 1 and "before" in names
        torch.testing.assert_close(weight, local.param("layers.3.mlp.W_in"))
    finally:
        worker.join()
    assert not errors
    assert model.save_context("long").num_runs == 40
    model.save_context("long").clear()
    model.save_context("before").clear()
