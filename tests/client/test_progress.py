"""run_dataset progress: streamed events become a tqdm bar or callback updates."""

from __future__ import annotations

import cloche
from cloche.api.progress import ProgressReporter
from cloche.client import connect

TEXTS = ["def f(x):\n    return x\n", "for i in range(3): pass"] * 10

def test_progress_callback_sees_done_total_tokens_eta(served):
    updates: list[dict] = []
    with connect(served.address, token=served.token) as model:
        out = model.run_dataset(
            TEXTS, batch_size=4, save="progress",
            probes={"layers.0.mlp.post": lambda ctx, x: ctx.reduce("m", x, cloche.Mean()) and None},
            progress=updates.append)
    assert updates, "no progress reached the client"
    last = updates[-1]
    assert last["done"] == last["total"] == len(TEXTS) == out["examples"]
    assert last["tokens"] == out["tokens"] > 0
    assert "eta" in last and "elapsed" in last
    assert [u["done"] for u in updates] == sorted(u["done"] for u in updates)

def test_progress_bar_default(served, capsys):
    with connect(served.address, token=served.token) as model:
        out = model.run_dataset(TEXTS, batch_size=5, save="bar")
    assert out["examples"] == len(TEXTS)
    assert f"{len(TEXTS)}/{len(TEXTS)}" in capsys.readouterr().err

def test_reporter_forwards_only_progress_to_callbacks():
    seen: list[dict] = []
    reporter = ProgressReporter(seen.append, "x")
    for event in [{"type": "queued", "position": 2}, {"type": "started"},
                  {"type": "progress", "done": 1, "total": 2, "tokens": 5}]:
        reporter(event)
    reporter.close()
    assert seen == [{"done": 1, "total": 2, "tokens": 5}]
