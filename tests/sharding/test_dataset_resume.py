"""A sharded dataset run checkpoints every rank's part and resumes bit for bit."""

from __future__ import annotations

import threading

import cloche
import numpy as np
import pytest
import torch
from cloche.errors import Cancelled
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S
from tests.threads import TORCH_THREADS
from tests.tiny_models import VOCAB

BATCH = 4


def early(ctx, x):  # embed: rank 0's
    ctx.reduce("early", x, cloche.Mean())
    ctx.save("early_rows", x[:, -1, :2])
    ctx.state["early"] = ctx.state.get("early", 0) + 1


def late(ctx, x):  # layers.3.resid_post: rank 1's
    ctx.reduce("late", x, cloche.Mean())
    ctx.reduce("top", x[..., :4], cloche.TopK(3))
    ctx.save("late_rows", x[:, -1, :2])
    ctx.state["late"] = ctx.state.get("late", 0) + 1


PROBES = {"embed": early, "layers.3.resid_post": late}
KEYS = ("early_rows", "late_rows")


def results(model, save):
    handle = model.save_context(save)
    return ({r: handle.result(r) for r in ("early", "late", "top")}, handle.state,
            {k: handle.fetch(k) for k in KEYS})


@pytest.fixture
def token_file(tmp_path):
    ids = np.random.default_rng(5).integers(0, VOCAB, size=40 * 12).astype(np.uint16)
    np.save(tmp_path / "t.npy", ids)
    return f"{tmp_path / 't.npy'}?seq_len=12"


def cancel_after(n: int) -> tuple[threading.Event, object]:
    cancel = threading.Event()
    seen: list[int] = []

    def progress(event):
        if event.get("type") == "progress":
            seen.append(event["done"])
            if len(seen) == n:
                cancel.set()

    return cancel, progress


@pytest.mark.slow
def test_a_cancelled_sharded_run_resumes_bit_identical(tiny4_dir, token_file, tmp_path):
    directory = tiny4_dir("gpt2")
    local = cloche.load(directory)
    local.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="one", progress=False)
    want = results(local, "one")
    dist = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS,
                       state_dir=tmp_path / "state")
    try:
        dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="whole",
                         progress=False)
        whole = results(dist, "whole")
        cancel, progress = cancel_after(5)  # checkpoints after batches 3 (and 6: never reached)
        with pytest.raises(Cancelled):
            dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="parts",
                             checkpoint_every=3, progress=progress, cancel=cancel)
        assert "parts" not in dist.save_contexts()  # one transaction: nothing committed
        done: list[int] = []
        out = dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="parts",
                               checkpoint_every=3, resume=True,
                               progress=lambda e: done.append(e.get("done")))
        resumed = results(dist, "parts")
        # the checkpoint is spent once committed: a second resume starts from the beginning
        again: list[int] = []
        dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="again",
                         checkpoint_every=3, resume=True,
                         progress=lambda e: again.append(e.get("done")))
    finally:
        dist.close()
    assert next(d for d in done if d is not None) == 4 * BATCH  # resumed after 3 batches
    assert next(d for d in again if d is not None) == BATCH
    assert out["examples"] == 40
    (red_r, state_r, rows_r), (red_w, state_w, rows_w) = resumed, whole
    assert state_r == state_w == {"early": 10, "late": 10}
    for name, fields in red_w.items():  # same processes, same threads: bit for bit
        for field, value in fields.items():
            assert torch.equal(red_r[name][field], value), (name, field)
    for key in KEYS:
        assert torch.equal(rows_r[key], rows_w[key]), key
    red_1, state_1, rows_1 = want  # and as one process computes them
    assert state_1 == state_w
    for name, fields in red_1.items():
        for field, value in fields.items():
            torch.testing.assert_close(red_w[name][field], value, atol=1e-5, rtol=0)
    for key in KEYS:
        torch.testing.assert_close(rows_w[key], rows_1[key], atol=1e-5, rtol=0)
