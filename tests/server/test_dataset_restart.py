"""A long dataset run on a server killed with SIGKILL resumes after a restart on the same
``--state-dir``: from its last checkpoint (bit-identical results) or, for an export, from its
last complete shard (the same shards as an uninterrupted export)."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import cloche
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest_server import ServerProcess
from tests.server.helpers import wait_until

TOKEN = "dataset-restart-token-0123456789"
POINT = "layers.0.resid_post"


def stats(ctx, x):
    ctx.reduce("mean", x, cloche.Mean())
    ctx.reduce("top", x[..., :4], cloche.TopK(3))
    ctx.state["batches"] = ctx.state.get("batches", 0) + 1


def stuck_from_24(ctx, x):
    """Holds the run at example 24 for good: the server is killed while it waits here."""
    if int(ctx.example_ids[0]) >= 24:
        threading.Event().wait()


def results(model, save):
    handle = model.save_context(save)
    return handle.result("mean"), handle.result("top"), handle.state


def token_file(tmp_path, vocab):
    ids = np.random.default_rng(1).integers(0, vocab, size=48 * 16).astype(np.uint16)
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    return f"{path}?seq_len=16"


def checkpoint_files(state):
    found = list((state / "runs").glob("*/manifest.json"))
    return len(json.loads(found[0].read_text())["files"]) if found else 0


def shards(folder):
    path = folder / "manifest.json"
    return json.loads(path.read_text())["shards"] if path.exists() else []


@pytest.mark.slow
def test_kill_9_mid_run_then_resume(server_model_dir, tmp_path):
    state = tmp_path / "state"
    first = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state))
    second = None
    try:
        model = cloche.connect(first.address, token=TOKEN)
        name = token_file(tmp_path, model.info()["d_vocab"])
        run = {"batch_size": 4, "progress": False}
        model.run_dataset(name, probes={POINT: stats}, save="whole", **run)
        want = results(model, "whole")
        export = {"export_points": [POINT], "export_shard_tokens": 128, **run}
        model.run_dataset(name, export=tmp_path / "export-whole", **export)

        # a checkpointed run, stuck at example 24 after checkpoints at 8, 16 and 24 examples
        stuck = model.submit("run_dataset", name, probes={POINT: [stats, stuck_from_24]},
                             save="parts", checkpoint_every=2, **run)
        assert wait_until(lambda: checkpoint_files(state) == 3)
        first.proc.kill()  # kill -9 in the middle of the run
        first.stop()
        assert stuck.exception(timeout=120) is not None  # the client was told it failed
        second = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state),
                               "--port", str(first.port))
        assert "parts" not in model.save_contexts()  # nothing committed: still a transaction
        done = []
        out = model.run_dataset(name, probes={POINT: stats}, save="parts", checkpoint_every=2,
                                resume=True, batch_size=4,
                                progress=lambda e: done.append(e.get("done")))
        assert out["examples"] == 48
        assert min(d for d in done if d is not None) > 24  # it went on from the checkpoint
        got = results(model, "parts")
        assert got[2] == want[2] == {"batches": 12}
        for g, w in zip(got[:2], want[:2], strict=True):
            assert all(torch.equal(g[k], w[k]) for k in w)

        # an export, killed after three of its six shards
        stuck = model.submit("run_dataset", name, probes={POINT: stuck_from_24},
                             export=tmp_path / "export", **export)
        assert wait_until(lambda: len(shards(tmp_path / "export")) == 3)
        second.proc.kill()
        second.stop()
        assert stuck.exception(timeout=120) is not None
        second = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state),
                               "--port", str(first.port))
        out = model.run_dataset(name, export=tmp_path / "export", **export)
        assert out["export"] == {"dir": str(tmp_path / "export"), "shards": 6, "written": 3,
                                 "tokens": 48 * 16, "complete": True}
        assert out["examples"] == 24  # the three complete shards were skipped
        for a, b in zip(shards(tmp_path / "export-whole"), shards(tmp_path / "export"),
                        strict=True):
            assert a == b
            x, y = load_file(tmp_path / "export-whole" / a["file"]), load_file(
                tmp_path / "export" / b["file"])
            assert all(torch.equal(x[k], y[k]) for k in x)
        model.close()
    finally:
        first.stop()
        if second is not None:
            second.stop()


@pytest.mark.slow
def test_a_cancel_stops_tokenizing_a_large_text_dataset(server_model_dir, tmp_path):
    """Tokenizing runs in pieces that check the cancel: the worker drops the half-tokenized
    stream (the cache keeps no entry), and the next run is served normally."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    line = "def f(x):\n    return [i * x for i in range(10)]  # a comment\n"
    for i in range(2000):
        (corpus / f"{i:05d}.py").write_text(line * 40 + f"# file {i}\n")
    state = tmp_path / "state"
    server = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state))
    try:
        model = cloche.connect(server.address, token=TOKEN)
        started = threading.Event()
        future = model.submit("run_dataset", str(corpus), probes={POINT: stats}, save="c",
                              on_event=lambda e: e.get("type") == "started" and started.set())
        assert started.wait(120)
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result()
        model.run("def f(x):")  # the worker is free again (runs queue behind the cancelled one)
        assert list((state / "datasets").glob("*.json")) == []  # no stream was completed
        assert list((state / "datasets").glob("*.tokens")) == []
        out = model.run_dataset(str(corpus) + "?seq_len=64", limit=4, progress=False)
        assert out["examples"] == 4  # and a run of it tokenizes it once, for good
        assert len(list((state / "datasets").glob("*.json"))) == 1
        model.close()
    finally:
        server.stop()
