"""Cancellation: future.cancel(), Ctrl-C, cancel events; partial writes rolled back, no hooks left."""

from __future__ import annotations

import concurrent.futures
import signal
import threading

import cloche
import pytest
import torch
from cloche.client import connect
from cloche.errors import Cancelled

from tests.server.helpers import hook_count, rss_bytes

LONG = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"] * 300
# Minutes of work even on an idle machine (tests cancel it): where a test checks that a run is
# still going after a few round trips, a loaded machine slows both alike, never enough to matter.
ENDLESS = LONG * 20
TEXT = "class Point:\n    def __init__(self, x):"


def save_everything(ctx, x):
    ctx.save("post", x)
    ctx.reduce("mean", x, cloche.Mean())


@pytest.fixture(scope="module")
def expected(server_model_dir):
    return cloche.load(server_model_dir).run(TEXT)


@pytest.fixture
def model(served):
    with connect(served.address, token=served.token) as m:
        yield m


def start_long_run(model, context="cancelled", texts=LONG):
    """Submit a long dataset run and return its future once the server is running it."""
    running = threading.Event()
    future = model.submit("run_dataset", texts, probes={"layers.0.mlp.post": save_everything},
                          save=context, batch_size=1,
                          progress=lambda update: update["type"] == "progress" and running.set())
    assert running.wait(120), "the dataset run never reported progress"
    return future


def test_fifty_cancels_in_a_row_each_followed_by_a_correct_run(model, served, expected):
    hooks_before = hook_count(model)
    rss_before = None
    for i in range(50):
        future = start_long_run(model)
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result()
        out = model.run(TEXT)
        assert torch.equal(out.logits, expected.logits), f"run after cancel {i} differs"
        if i == 9:
            rss_before = rss_bytes(served.proc.pid)  # after warm-up allocations
    assert hook_count(model) == hooks_before
    handle = model.save_context("cancelled")
    assert handle.keys() == [] and handle.num_runs == 0 and handle.reducers() == {}
    growth = rss_bytes(served.proc.pid) - rss_before
    assert growth < 64 * 2**20, f"server memory grew by {growth / 2**20:.1f} MiB over 40 cancels"


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here, as in a terminal, even when the suite was started
    in the background (`pytest &` in a script, nohup): such processes inherit SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_cancels_on_the_server_and_keeps_the_connection(model, expected, ctrl_c_raises):
    main = threading.main_thread().ident
    fired = threading.Event()

    def interrupt(update):
        if not fired.is_set():
            fired.set()
            signal.pthread_kill(main, signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        model.run_dataset(LONG, probes={"layers.0.mlp.post": save_everything}, save="ctrl-c",
                          batch_size=1, progress=interrupt)
    out = model.run(TEXT)  # same connection, queued behind the cancelled run
    assert torch.equal(out.logits, expected.logits)
    assert model.save_context("ctrl-c").keys() == []
    assert hook_count(model) == 0


def test_cancel_event_argument_like_the_local_model(model):
    cancel = threading.Event()
    with pytest.raises(Cancelled):  # set once the server reports the run under way
        model.run_dataset(LONG, probes={"layers.0.mlp.post": save_everything}, save="evt",
                          batch_size=1, cancel=cancel,
                          progress=lambda update: update["type"] == "progress" and cancel.set())
    assert cancel.is_set()
    assert model.save_context("evt").num_runs == 0


def test_cancel_while_queued_answers_at_once(served, model):
    running = start_long_run(model, "first", ENDLESS)
    with connect(served.address, token=served.token) as other:
        events = []
        queued = other.submit("run", TEXT, on_event=events.append)
        assert queued.cancel()
        assert other.ping("alive") == "alive"
        assert not running.done()
    running.cancel()


def test_a_probe_that_raises_is_a_probe_error_and_leaves_nothing(model, expected):
    def saves_then_fails(ctx, x):
        ctx.save("half", x)
        if ctx.layer == 1:
            raise ValueError("deliberate failure")

    with pytest.raises(cloche.ProbeError) as info:
        model.run(TEXT, probes={"layers.0.mlp.post": saves_then_fails,
                                "layers.1.mlp.post": saves_then_fails}, save="failing")
    err = info.value
    assert err.point == "layers.1.mlp.post" and err.probe.endswith("saves_then_fails")
    assert err.request_id is not None and "deliberate failure" in err.remote_traceback
    assert "ValueError" in err.remote_traceback
    assert model.save_context("failing").keys() == []
    assert torch.equal(model.run(TEXT).logits, expected.logits)
    assert hook_count(model) == 0


def test_errors_keep_their_cloche_class(model):
    with pytest.raises(cloche.UnknownProbePoint):
        model.run(TEXT, probes={"layers.99.nothing": lambda ctx, x: None})
    with pytest.raises(cloche.UsageError):
        model.generate(TEXT, max_new_tokens=0)
    with pytest.raises(cloche.CallError, match="ZeroDivisionError"):
        model.call(lambda m: 1 / 0)
