"""Lost ranks and cancellation: errors instead of hangs, state stays consistent.

Faults and cancels are triggered by the run itself (a probe on the rank that should act), never
by a timer, so the tests do the same thing on an idle and on a saturated machine. A hang is
caught by pytest's timeout; no test measures how long detection took.
"""

from __future__ import annotations

import os
import signal
import threading

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS
from tests.tiny_models import VOCAB

WAIT_S = 120.0  # bound for waits on an event that comes in well under a second when idle


def die(ctx, x):
    """A probe that kills the rank running it, in the middle of a run."""
    os.kill(os.getpid(), signal.SIGKILL)


def test_killed_rank_raises_worker_lost_naming_it(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 3, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        assert model.executor.ping_ranks() == [0, 1, 2]
        assert model.owner_of("layers.3.mlp.out") == 2
        with pytest.raises(cloche.WorkerLost) as info:  # rank 2 dies inside this run
            model.run(ids_batch(), probes={"layers.3.mlp.out": die})
        assert info.value.rank == 2
        with pytest.raises(cloche.WorkerLost):
            model.run(ids_batch())
        codes = model.executor.group.wait(timeout_s=WAIT_S)
        assert codes[2] == -signal.SIGKILL
        assert codes[1] == 3  # the surviving worker noticed and exited with the documented code
    finally:
        model.close()


def test_hung_rank_is_detected_by_heartbeat(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    victim = model.executor.group.processes[1]
    try:
        model.run(ids_batch())
        os.kill(victim.pid, signal.SIGSTOP)
        with pytest.raises(cloche.WorkerLost) as info:
            model.run(ids_batch())
        assert info.value.rank == 1
        assert "heartbeat" in str(info.value)
    finally:
        victim.kill()
        model.close()


def _dataset(n: int = 40) -> Dataset:
    g = torch.Generator().manual_seed(9)
    return Dataset([torch.randint(3, VOCAB, (8,), generator=g).tolist() for _ in range(n)],
                   name="cancel", seq_len=8, pad_id=2)


def _stats(ctx, x):
    ctx.reduce("mean", x, cloche.Mean())


def _last_stats(ctx, x):
    ctx.reduce("mean_last", x, cloche.Mean())


@pytest.fixture(scope="module")
def group2(tiny4_dir):
    directory = tiny4_dir("gpt2")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()


def test_cancel_during_dataset_run_then_normal_run(group2):
    local, model = group2
    probes = {"layers.0.resid_post": _stats, "layers.3.resid_post": _last_stats}
    try:
        cancel = threading.Event()
        seen = []

        def progress(update):
            if update["type"] != "progress":  # also "started", "done"
                return
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


class SeenCancel:
    """A cancel event that also tells when the model has acted on it.

    ``run`` hands its ``cancel`` to rank 0's control poller, which reads ``is_set()`` every
    slice and, on reading True, raises the abort flag for every rank before its next read. So
    once ``is_set()`` has returned True twice, the abort is in place everywhere.
    """

    def __init__(self) -> None:
        self._set = threading.Event()
        self._reads_while_set = 0
        self.acted_on = threading.Event()

    def set(self) -> None:
        self._set.set()

    def is_set(self) -> bool:
        if not self._set.is_set():
            return False
        self._reads_while_set += 1
        if self._reads_while_set >= 2:
            self.acted_on.set()
        return True


_MID_RUN_CANCEL: list[SeenCancel] = []  # probes reach it by name (they are pickled by reference)


def save_then_cancel(ctx, x):
    """On rank 0 (this process): save something, cancel, and wait until the abort is up."""
    ctx.save("partial", x)
    cancel = _MID_RUN_CANCEL[-1]
    cancel.set()
    assert cancel.acted_on.wait(WAIT_S), "the model never read the cancel event"


def test_cancel_mid_run_reaches_every_rank(group2):
    local, model = group2
    assert model.owner_of("layers.0.mlp.out") == 0 and model.owner_of("layers.3.mlp.out") == 1
    try:
        cancel = SeenCancel()
        _MID_RUN_CANCEL.append(cancel)
        with pytest.raises(cloche.Cancelled):  # rank 1 is waiting for rank 0's activations
            model.run(ids_batch(), probes={"layers.0.mlp.out": save_then_cancel,
                                           "layers.3.mlp.out": _stats},
                      save="mid", cancel=cancel)
        assert model.save_context("mid").keys() == []
        assert model.save_context("mid").reducers() == {}
        assert model.executor.ping_ranks() == [0, 1]
        torch.testing.assert_close(model.run(ids_batch()).logits, local.run(ids_batch()).logits,
                                   atol=1e-5, rtol=0)
    finally:
        model.save_context("mid").clear()


def test_cancel_mid_generation_reaches_every_rank(group2):
    """Rank 1 follows rank 0's decode loop step by step; a cancel stops both, keeps nothing."""
    local, model = group2
    prompt = torch.tensor([5, 17, 42, 9])
    try:
        cancel = SeenCancel()
        _MID_RUN_CANCEL.append(cancel)
        with pytest.raises(cloche.Cancelled):
            model.generate(prompt, 8, probes={"layers.0.mlp.out": save_then_cancel,
                                              "layers.3.mlp.out": _stats},
                           save="midgen", cancel=cancel)
        assert model.save_context("midgen").keys() == []
        assert model.save_context("midgen").reducers() == {}
        assert model.executor.ping_ranks() == [0, 1]
        assert torch.equal(model.generate(prompt, 8).tokens, local.generate(prompt, 8).tokens)
    finally:
        model.save_context("midgen").clear()


def test_reads_are_answered_while_a_dataset_run_is_in_progress(group2):
    local, model = group2
    model.save_context("before").clear()
    model.run(ids_batch(), probes={"layers.3.mlp.out": lambda c, x: c.save("x", x)},
              save="before")
    started, release, done = threading.Event(), threading.Event(), threading.Event()
    errors = []

    def hold(update):
        """Rank 0 reports progress between batches: the run waits here until the reads end."""
        started.set()
        release.wait(WAIT_S)

    def long_run():
        try:
            model.run_dataset(_dataset(), probes={"layers.3.resid_post": _last_stats},
                              save="long", batch_size=1, progress=hold)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            done.set()

    worker = threading.Thread(target=long_run)
    worker.start()
    try:
        assert started.wait(WAIT_S), "the dataset run never reported progress"
        saved = model.save_context("before").fetch("x")  # held by rank 1, inside the run
        weight = model.param("layers.3.mlp.W_in")
        names = model.save_contexts()
        assert not done.is_set()  # all three were answered while the run was still going
        assert saved.shape[0] == 1 and "before" in names
        torch.testing.assert_close(weight, local.param("layers.3.mlp.W_in"))
    finally:
        release.set()
        worker.join()
    assert not errors
    assert model.save_context("long").num_runs == 40
    model.save_context("long").clear()
    model.save_context("before").clear()
