"""Dataset runs at scale: token files, checkpoints that resume bit for bit, activation export."""

from __future__ import annotations

import json
import threading

import cloche
import numpy as np
import pytest
import torch
from cloche import data
from cloche.errors import Cancelled, UsageError
from safetensors.torch import load_file

FAMILY = "llama"


@pytest.fixture
def model(tiny_model):
    m = tiny_model(FAMILY)
    yield m
    for name in m.save_contexts():
        m.save_context(name).clear()


@pytest.fixture
def tokens(tmp_path, model):
    """A 1-D uint16 token file: 40 examples of 16 tokens."""
    vocab = model.info()["d_vocab"]
    ids = np.random.default_rng(0).integers(0, vocab, size=40 * 16).astype(np.uint16)
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    return path, ids


def stats(ctx, x):
    ctx.reduce("mean", x, cloche.Mean())
    ctx.reduce("top", x[..., :4], cloche.TopK(3))
    ctx.state["batches"] = ctx.state.get("batches", 0) + 1


def results(model, save):
    handle = model.save_context(save)
    return handle.result("mean"), handle.result("top"), handle.state


def same(a, b):
    (ma, ta, sa), (mb, tb, sb) = a, b
    assert sa == sb
    for got, want in ((ma, mb), (ta, tb)):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), key


def test_a_token_file_runs_by_name_with_its_example_ids(model, tokens):
    path, ids = tokens
    seen = []

    def grab(ctx, x):
        seen.append((ctx.example_ids.clone(), ctx.tokens.clone()))

    out = model.run_dataset(f"{path}?seq_len=16", probes={"embed": grab}, batch_size=8,
                            limit=12, progress=False)
    assert out["examples"] == 12 and out["tokens"] == 12 * 16
    got_ids = torch.cat([e for e, _ in seen])
    assert got_ids.tolist() == list(range(12))
    rows = torch.cat([t for _, t in seen])
    assert torch.equal(rows, torch.from_numpy(ids[:12 * 16].astype(np.int64)).view(12, 16))


def test_checkpointed_run_cancelled_then_resumed_is_bit_identical(model, tokens):
    path, _ = tokens
    name = f"{path}?seq_len=16"
    model.run_dataset(name, probes={"layers.0.resid_post": stats}, batch_size=4,
                      save="whole", progress=False)
    want = results(model, "whole")

    cancel = threading.Event()
    batches = []

    def stop_after_six(event):
        if event.get("type") == "progress":
            batches.append(event["done"])
            if len(batches) == 6:
                cancel.set()

    with pytest.raises(Cancelled):
        model.run_dataset(name, probes={"layers.0.resid_post": stats}, batch_size=4,
                          save="parts", checkpoint_every=4, progress=stop_after_six,
                          cancel=cancel)
    assert "parts" not in model.save_contexts()  # still one transaction: nothing committed
    resumed = []
    out = model.run_dataset(name, probes={"layers.0.resid_post": stats}, batch_size=4,
                            save="parts", checkpoint_every=4, resume=True,
                            progress=lambda e: resumed.append(e.get("done")))
    assert next(d for d in resumed if d is not None) == 20  # the checkpoint: after 4 batches
    assert out["examples"] == 40
    same(results(model, "parts"), want)


def test_resume_refuses_another_run(model, tokens):
    path, _ = tokens
    cancel = threading.Event()

    def stop(event):
        if event.get("type") == "progress" and event["done"] >= 12:
            cancel.set()

    with pytest.raises(Cancelled):
        model.run_dataset(f"{path}?seq_len=16", probes={"embed": stats}, batch_size=4,
                          save="c", checkpoint_every=1, progress=stop, cancel=cancel)
    with pytest.raises(UsageError, match="batch_size differ"):
        model.run_dataset(f"{path}?seq_len=16", probes={"embed": stats}, batch_size=2,
                          save="c", resume=True, progress=False)
    # without resume=True it starts over, and a resume with no checkpoint simply runs
    out = model.run_dataset(f"{path}?seq_len=16", probes={"embed": stats}, batch_size=2,
                            save="c", checkpoint_every=3, progress=False)
    assert out["examples"] == 40
    out = model.run_dataset(f"{path}?seq_len=16", probes={"embed": stats}, batch_size=2,
                            save="d", resume=True, progress=False)
    assert out["examples"] == 40


def test_checkpoints_survive_in_a_state_dir(tiny_dir, tokens, tmp_path):
    """A new process (a model loaded again on the same state dir) resumes the run."""
    path, _ = tokens
    name = f"{path}?seq_len=16"
    first = cloche.load(tiny_dir(FAMILY), state_dir=tmp_path / "state")
    first.run_dataset(name, probes={"embed": stats}, batch_size=4, save="whole",
                      progress=False)
    want = results(first, "whole")
    cancel = threading.Event()

    def stop(event):
        if event.get("type") == "progress" and event["done"] >= 28:
            cancel.set()

    with pytest.raises(Cancelled):
        first.run_dataset(name, probes={"embed": stats}, batch_size=4, save="parts",
                          checkpoint_every=3, progress=stop, cancel=cancel)
    assert (tmp_path / "state" / "runs" / "parts" / "manifest.json").exists()
    second = cloche.load(tiny_dir(FAMILY), state_dir=tmp_path / "state")
    out = second.run_dataset(name, probes={"embed": stats}, batch_size=4, save="parts",
                             checkpoint_every=3, resume=True, progress=False)
    assert out["examples"] == 40
    same(results(second, "parts"), want)
    assert not (tmp_path / "state" / "runs" / "parts").exists()  # spent once committed


def read_export(folder):
    manifest = json.loads((folder / "manifest.json").read_text())
    shards = [load_file(folder / s["file"]) for s in manifest["shards"]]
    return manifest, {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_export_writes_shards_that_match_the_activations(model, tokens, tmp_path):
    path, _ = tokens
    name = f"{path}?seq_len=16"
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 16]]
    ds = data.Dataset(rows, name="ragged", seq_len=16, pad_id=0)  # padding in every batch
    out = model.run_dataset(ds, export=tmp_path / "ex", export_points=["layers.1.resid_post"],
                            export_shard_tokens=8, batch_size=2, progress=False)
    assert out["export"]["complete"]
    manifest, got = read_export(tmp_path / "ex")
    assert manifest["points"]["layers.1.resid_post"]["dtype"] == "float16"
    assert [s["examples"] for s in manifest["shards"]] == [[0, 2], [2, 3]]
    want, ids, pos = [], [], []
    for i in range(len(rows)):
        res = model.run(ds[i].unsqueeze(0), probes={
            "layers.1.resid_post": lambda ctx, x: ctx.save("x", x)}, save="ref")
        del res
        x = model.save_context("ref").fetch("x", "list")[-1][0]
        want.append(x.to(torch.float16))
        ids += [i] * x.shape[0]
        pos += list(range(x.shape[0]))
    assert got["example_ids"].tolist() == ids and got["positions"].tolist() == pos
    torch.testing.assert_close(got["layers.1.resid_post"], torch.cat(want), atol=1e-2,
                               rtol=1e-2)

    with pytest.raises(UsageError, match="another export"):
        model.run_dataset(name, export=tmp_path / "ex", export_points=["layers.1.resid_post"],
                          progress=False)


def test_a_cancelled_export_resumes_and_skips_its_shards(model, tokens, tmp_path):
    path, _ = tokens
    name = f"{path}?seq_len=16"
    kwargs = {"export_points": ["embed"], "export_shard_tokens": 64, "batch_size": 4}
    model.run_dataset(name, export=tmp_path / "whole", progress=False, **kwargs)
    cancel = threading.Event()

    def stop(event):
        if event.get("type") == "progress" and event["done"] >= 24:
            cancel.set()

    with pytest.raises(Cancelled):
        model.run_dataset(name, export=tmp_path / "parts", progress=stop, cancel=cancel,
                          **kwargs)
    manifest = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert 0 < len(manifest["shards"]) < 10 and not manifest["complete"]
    out = model.run_dataset(name, export=tmp_path / "parts", progress=False, **kwargs)
    assert out["export"]["complete"] and out["export"]["written"] == 10 - len(
        manifest["shards"])
    assert out["examples"] == 40 - 4 * len(manifest["shards"])  # the written shards skipped
    (_, want), (_, got) = read_export(tmp_path / "whole"), read_export(tmp_path / "parts")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_export_arguments_are_checked(model, tokens, tmp_path):
    path, _ = tokens
    with pytest.raises(UsageError, match="export_points"):
        model.run_dataset(str(path), export_points=["embed"], progress=False)
    with pytest.raises(UsageError, match="export_dtype"):
        model.run_dataset(str(path), export=tmp_path / "e", export_points=["embed"],
                          export_dtype="int8", progress=False)
    with pytest.raises(UsageError, match="checkpoint_every"):
        model.run_dataset(str(path), checkpoint_every=0, progress=False)


def test_export_and_checkpoints_together_resume_at_a_shard_end(model, tokens, tmp_path):
    """Checkpoints fall at shard ends, so the resumed run writes whole shards."""
    path, _ = tokens
    name = f"{path}?seq_len=16"
    kwargs = {"probes": {"embed": stats}, "export_points": ["embed"], "batch_size": 4,
              "export_shard_tokens": 128, "checkpoint_every": 1}  # shards of 2 batches
    model.run_dataset(name, export=tmp_path / "whole", save="whole", progress=False, **kwargs)
    want = results(model, "whole")
    cancel = threading.Event()

    def stop(event):
        if event.get("type") == "progress" and event["done"] >= 12:  # after 3 batches
            cancel.set()

    with pytest.raises(Cancelled):
        model.run_dataset(name, export=tmp_path / "parts", save="parts", progress=stop,
                          cancel=cancel, **kwargs)
    done = []
    out = model.run_dataset(name, export=tmp_path / "parts", save="parts", resume=True,
                            progress=lambda e: done.append(e.get("done")), **kwargs)
    assert next(d for d in done if d is not None) == 12  # the checkpoint after batch 2
    assert out["export"]["complete"] and out["export"]["shards"] == 5
    same(results(model, "parts"), want)
    (_, a), (_, b) = read_export(tmp_path / "whole"), read_export(tmp_path / "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
