"""A sharded dataset run checkpoints every rank's part and resumes bit for bit; its export is
written by the ranks that own the points and equals one process's."""

from __future__ import annotations

import json
import pathlib
import threading

import cloche
import numpy as np
import pytest
import torch
from cloche.errors import Cancelled, UsageError
from cloche.sharding.launch import start_local
from safetensors.torch import load_file

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
        cancel, progress = cancel_after(5)
        with pytest.raises(Cancelled):
            dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="restart",
                             checkpoint_every=1, progress=progress, cancel=cancel)
    finally:
        dist.close()
    # as if rank 1 had stopped before writing its last checkpoint: rank 0's is not used either
    ranks = [json.loads((tmp_path / "state" / f"rank-{r}" / "runs" / "restart" /
                         "manifest.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["files"]) >= 2 and len(ranks[1]["files"]) >= 2
    held = min(len(m["files"]) for m in ranks) - 1
    rank1 = tmp_path / "state" / "rank-1" / "runs" / "restart" / "manifest.json"
    rank1.write_text(json.dumps({**ranks[1], "files": ranks[1]["files"][:held]}))
    dist = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS,
                       state_dir=tmp_path / "state")  # a new group on the same state dir
    try:
        restarted: list[int] = []
        dist.run_dataset(token_file, probes=PROBES, batch_size=BATCH, save="restart",
                         checkpoint_every=1, resume=True,
                         progress=lambda e: restarted.append(e.get("done")))
        after_restart = results(dist, "restart")
    finally:
        dist.close()
    assert next(d for d in restarted if d is not None) == (held + 1) * BATCH
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
    red_a, state_a, rows_a = after_restart
    assert state_a == state_w
    for name, fields in red_w.items():
        for field, value in fields.items():
            assert torch.equal(red_a[name][field], value), (name, field)
    for key in KEYS:
        assert torch.equal(rows_a[key], rows_w[key]), key
    red_1, state_1, rows_1 = want  # and as one process computes them
    assert state_1 == state_w
    for name, fields in red_1.items():
        for field, value in fields.items():
            torch.testing.assert_close(red_w[name][field], value, atol=1e-5, rtol=0)
    for key in KEYS:
        torch.testing.assert_close(rows_w[key], rows_1[key], atol=1e-5, rtol=0)


EXPORT = {"export_points": ["embed", "layers.3.resid_post"], "export_dtype": "float16",
          "export_shard_tokens": 96}  # batches of 4 x 12 tokens: 2 batches a shard


def read_export(folder: pathlib.Path) -> tuple[list[dict], dict[str, dict[str, torch.Tensor]]]:
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["complete"]
    return manifest["shards"], {s["file"]: load_file(folder / s["file"])
                                for s in manifest["shards"]}


@pytest.mark.slow
def test_a_sharded_export_matches_one_process_and_resumes(tiny4_dir, token_file, tmp_path):
    directory = tiny4_dir("gpt2")
    local = cloche.load(directory)
    local.run_dataset(token_file, export=tmp_path / "one", batch_size=BATCH, progress=False,
                      **EXPORT)
    want_shards, want = read_export(tmp_path / "one")
    dist = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        out = dist.run_dataset(token_file, export=tmp_path / "whole", batch_size=BATCH,
                               progress=False, **EXPORT)
        cancel, progress = cancel_after(5)
        with pytest.raises(Cancelled):
            dist.run_dataset(token_file, export=tmp_path / "parts", batch_size=BATCH,
                             progress=progress, cancel=cancel, **EXPORT)
        done: list[int] = []
        resumed = dist.run_dataset(token_file, export=tmp_path / "parts", batch_size=BATCH,
                                   progress=lambda e: done.append(e.get("done")), **EXPORT)
        cancel, progress = cancel_after(5)  # with probes and checkpoints: at shard ends
        with pytest.raises(Cancelled):
            dist.run_dataset(token_file, probes=PROBES, save="both", export=tmp_path / "both",
                             batch_size=BATCH, checkpoint_every=1, progress=progress,
                             cancel=cancel, **EXPORT)
        both: list[int] = []
        dist.run_dataset(token_file, probes=PROBES, save="both", export=tmp_path / "both",
                         batch_size=BATCH, checkpoint_every=1, resume=True,
                         progress=lambda e: both.append(e.get("done")), **EXPORT)
        with pytest.raises(UsageError, match=r"other ranks|one process"):
            dist.run_dataset(token_file, export=tmp_path / "one", batch_size=BATCH,
                             progress=False, **EXPORT)
    finally:
        dist.close()
    assert out["export"]["complete"] and sorted(out["export"]["ranks"]) == [0, 1]
    assert resumed["export"]["complete"]
    assert max(d for d in done if d is not None) < 40  # the shards written were skipped
    assert 0 < resumed["export"]["written"] < out["export"]["written"]
    assert next(d for d in both if d is not None) == 5 * BATCH  # after batch 4, a shard end
    for name in ("whole", "parts", "both"):
        top = json.loads((tmp_path / name / "manifest.json").read_text())
        assert top["points"] == {"embed": "rank-0", "layers.3.resid_post": "rank-1"}
        for rank, point in enumerate(EXPORT["export_points"]):
            shards, got = read_export(tmp_path / name / f"rank-{rank}")
            assert shards == want_shards  # the same files, example ranges and token counts
            for file, tensors in got.items():
                assert sorted(tensors) == sorted(["example_ids", "positions", point])
                for key in ("example_ids", "positions"):
                    assert torch.equal(tensors[key], want[file][key])
                assert tensors[point].dtype == torch.float16
                torch.testing.assert_close(tensors[point].float(), want[file][point].float(),
                                           atol=2e-3, rtol=2e-3)
