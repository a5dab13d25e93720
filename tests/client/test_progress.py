"""Progress over the wire: a server's streamed events become a tqdm bar or callback updates
(the rules are in cloche.api.progress; every experiment is checked in tests/experiments)."""

from __future__ import annotations

import threading

import cloche
import cloche.api.progress as progress_module
import pytest
import torch
from cloche.api.progress import Progress
from cloche.api.requests import Run
from cloche.client import connect
from cloche.client.connection import ClientConnection
from cloche.client.executor import parse_address

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

@pytest.fixture
def bars_at_once(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)


def test_progress_bar_default(served, capsys, bars_at_once):
    with connect(served.address, token=served.token) as model:
        out = model.run_dataset(TEXTS, batch_size=5, save="bar")
    assert out["examples"] == len(TEXTS)
    assert f"{len(TEXTS)}/{len(TEXTS)}" in capsys.readouterr().err


def test_remote_run_and_generate_report_and_can_be_silenced(served, capfd, bars_at_once):
    with connect(served.address, token=served.token) as model:
        events: list[dict] = []
        model.run("hello", progress=events.append)
        # an idle server queues the request as next, then starts it
        assert [e["type"] for e in events if e["type"] != "queued"] == ["started", "done"]
        assert all(e["ahead"] == 0 for e in events if e["type"] == "queued")
        events.clear()
        model.generate("hello", 2, progress=events.append)
        assert [e["type"] for e in events if e["type"] != "queued"] == ["started", "done"]
        capfd.readouterr()
        model.run("hello", progress=False)
        model.generate("hello", 2, progress=False)
        assert capfd.readouterr().err == ""
        model.run("hello")
        assert "run" in capfd.readouterr().err
        events.clear()  # submit takes progress= too (quiet unless given: the caller goes on)
        model.submit("run", "hello", progress=events.append).result()
        assert [e["type"] for e in events if e["type"] != "queued"] == ["started", "done"]
        model.submit("run", "hello").result()
        assert capfd.readouterr().err == ""


def test_reporter_forwards_queue_start_and_progress_events_to_callbacks():
    seen: list[dict] = []
    reporter = Progress(seen.append, "x")
    events = [{"type": "queued", "position": 2, "ahead": 2}, {"type": "started"},
              {"type": "progress", "done": 1, "total": 2, "tokens": 5}, {"type": "other"}]
    for event in events:
        reporter(event)
    reporter.close()
    assert seen[:2] == events[:2]
    assert seen[2] == {**events[2], "unit": "it"}  # what the count counts is said
    assert seen[3]["type"] == "done" and seen[3]["ok"] is True and len(seen) == 4


def test_the_bar_says_how_many_requests_run_first(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY_S", 3600.0)  # only the queue puts it up early
    reporter = Progress(True, "run_dataset")
    assert not reporter.due()
    reporter({"type": "queued", "position": 2, "ahead": 1})
    assert reporter.describe() == "run_dataset (queued: 1 ahead)" and reporter.due()
    reporter({"type": "queued", "position": 1, "ahead": 0})
    assert reporter.describe() == "run_dataset (queued: next)"
    reporter({"type": "started"})
    assert reporter.describe() == "run_dataset"
    reporter.close()
    assert not reporter.due()


def test_a_request_next_in_line_waits_for_the_delay_like_any_call(monkeypatch):
    monkeypatch.setattr(progress_module, "DELAY_S", 3600.0)
    reporter = Progress(True, "run")
    reporter({"type": "queued", "position": 1, "ahead": 0})  # next: as a quick call, no bar
    assert not reporter.due()
    reporter.close()


def test_what_the_bar_shows_is_drawn_where_the_call_was_made(capsys, bars_at_once):
    """Events may arrive on another thread (a connection's reader); the caller draws the final
    state when the call ends, so the output is there even if no tick came between."""
    import threading

    reporter = Progress(True, "run_dataset", unit="ex")
    reader = threading.Thread(target=lambda: [
        reporter({"type": "queued", "position": 1, "ahead": 0}),
        reporter({"type": "progress", "done": 7, "total": 7, "tokens": 70})])
    reader.start()
    reader.join()
    reporter.close()
    err = capsys.readouterr().err
    assert "run_dataset" in err and "7/7" in err and "tokens=70" in err


def test_text_bars_in_a_notebook_are_drawn_by_the_calls_own_thread(monkeypatch, capsys,
                                                                   bars_at_once):
    """A Jupyter kernel sends a thread's text to the cell that started the thread: there (tqdm
    without ipywidgets) each call draws from a thread of its own, which ends with the call."""
    import sys
    import types

    assert not progress_module._text_bars_in_a_notebook()  # a terminal: the shared ticker
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    assert progress_module._text_bars_in_a_notebook()  # tqdm.auto is text here: own thread
    reporter = Progress(True, "run")
    drawer = reporter._drawer
    assert drawer is not None and drawer.is_alive()
    reporter({"type": "progress", "done": 1, "total": 2})
    reporter.close()
    assert not drawer.is_alive()
    assert "1/2" in capsys.readouterr().err


HOLD = threading.Event()


def held(m):
    """Runs on the server until the test lets it go (keeps the queue busy)."""
    return HOLD.wait(60)


def test_a_run_queued_behind_another_shows_its_bar_at_once(tiny_model, capfd, monkeypatch):
    from tests.server.helpers import InProcessServer, wait_for

    monkeypatch.setattr(progress_module, "DELAY_S", 3600.0)  # only the queue can put it up
    HOLD.clear()
    with InProcessServer(tiny_model("gpt2")) as server, \
            connect(server.address, token=server.token) as a, \
            connect(server.address, token=server.token) as b:
        started = threading.Event()
        busy = a.submit("call", held, on_event=lambda e: e["type"] == "started" and started.set())
        assert started.wait(60)
        waiting = b.submit("run", [[5, 6, 7]], progress=True)
        seen: list[str] = []

        def bar_up() -> bool:
            seen.append(capfd.readouterr().err)
            return "run (queued: 1 ahead)" in "".join(seen)

        try:
            assert wait_for(bar_up), "".join(seen)
        finally:
            HOLD.set()
        busy.result(timeout=60)
        assert waiting.result(timeout=60).logits.shape[:2] == (1, 3)


def test_a_submit_with_bad_arguments_leaves_no_bar_behind(tiny_model, monkeypatch):
    monkeypatch.setattr(progress_module, "_TICKER", progress_module._Ticker())
    model = tiny_model("gpt2")
    with pytest.raises(cloche.UsageError):
        model.submit("run", [[5, 6]], micro_batches=0, progress=True)
    assert len(progress_module._TICKER._active) == 0
    model.submit("run", [[5, 6]], progress=True).result()
    assert len(progress_module._TICKER._active) == 0


def test_reporters_ask_for_only_the_events_they_show():
    assert Progress(lambda e: None, "x").wanted_events == "all"
    assert Progress(False, "x").wanted_events == "none"
    with Progress(lambda e: None, "outer"):
        assert Progress(True, "inner").wanted_events == "all"  # reports to the outer callback
    assert Progress(True, "x").wanted_events == "shown"


class _Sink(list):
    """An event callback that asks the server for a chosen level of events."""

    def __init__(self, wanted: str) -> None:
        super().__init__()
        self.wanted_events = wanted

    def __call__(self, event: dict) -> None:
        self.append(event)


def test_the_server_sends_a_request_only_the_events_asked_for(served):
    host, port = parse_address(served.address)
    conn = ClientConnection(host, port, token=served.token)
    try:
        ids = torch.tensor([[1, 2, 3]])
        run = Run(ids=ids, mask=torch.ones_like(ids), return_logits=False)
        sinks = {level: _Sink(level) for level in ("all", "shown", "none")}
        for _ in range(3):
            for sink in sinks.values():
                conn.submit(run, on_event=sink).result(timeout=60)
    finally:
        conn.close()
    assert [e["type"] for e in sinks["all"] if e["type"] != "queued"] == ["started"] * 3
    # nothing ran ahead of these requests: a bar shows nothing of their queueing
    assert list(sinks["shown"]) == [] and list(sinks["none"]) == []


def test_back_to_back_runs_never_see_the_previous_one_ahead_of_them(served):
    """The reply leaves once the worker is free, so the next request, sent the moment the
    reply arrives, never finds the finished run still ahead of it in the queue."""
    with connect(served.address, token=served.token) as model:
        events: list[dict] = []
        for _ in range(30):
            model.run([1, 2, 3], return_logits=False, progress=events.append)
        assert [e["type"] for e in events].count("started") == 30
        assert all(e["ahead"] == 0 for e in events if e["type"] == "queued")
