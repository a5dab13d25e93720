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
    updates = [u for u in updates if u["type"] == "progress"]
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

def test_reporter_forwards_queue_start_and_progress_events_to_callbacks():
    seen: list[dict] = []
    reporter = ProgressReporter(seen.append, "x")
    events = [{"type": "queued", "position": 2, "ahead": 2}, {"type": "started"},
              {"type": "progress", "done": 1, "total": 2, "tokens": 5}, {"type": "other"}]
    for event in events:
        reporter(event)
    reporter.close()
    assert seen == events[:3]


def test_the_bar_says_how_many_requests_run_first(capsys):
    reporter = ProgressReporter(True, "run_dataset")
    reporter({"type": "queued", "position": 1, "ahead": 1})
    assert "(queued: 1 ahead)" in reporter._bar.desc
    reporter({"type": "queued", "position": 1, "ahead": 0})
    assert "(queued: next)" in reporter._bar.desc
    reporter({"type": "started"})
    assert "queued" not in reporter._bar.desc
    reporter.close()
