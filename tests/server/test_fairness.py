"""Fair service: queue positions while the worker is busy, and a long dataset run that yields to
other sessions between its batches (their requests wait for one batch, not the whole run)."""

from __future__ import annotations

import threading

import cloche
import pytest

from tests.server.helpers import InProcessServer

# Module level, so that shipped functions refer to them by reference: the in-process server
# runs them in this process, where the test holds the other end.
HOLD = threading.Event()
PERMITS = threading.Semaphore(0)


def held(model):
    """A request that keeps the worker until the test lets go."""
    HOLD.wait(60)


def one_batch_per_permit(ctx, x):
    """Each batch of the dataset run waits for a permit from the test."""
    PERMITS.acquire(timeout=60)
    ctx.reduce("m", x, cloche.Mean())


@pytest.fixture(scope="module")
def server(server_model_dir):
    with InProcessServer(cloche.load(server_model_dir)) as running:
        yield running


def _events_until(events: list[dict], kind: str, done: threading.Event):
    def on_event(event: dict) -> None:
        events.append(event)
        if event.get("type") == kind:
            done.set()
    return on_event


def test_waiting_clients_see_their_queue_position(server):
    HOLD.clear()
    with cloche.connect(server.address, token=server.token) as a, \
            cloche.connect(server.address, token=server.token) as b, \
            cloche.connect(server.address, token=server.token) as c:
        started = threading.Event()
        busy = a.submit("call", held, on_event=lambda e: e.get("type") == "started"
                        and started.set())
        assert started.wait(60)
        b_events: list[dict] = []
        c_events: list[dict] = []
        b_queued, c_queued = threading.Event(), threading.Event()
        b_future = b.submit("run", "def f():", on_event=_events_until(b_events, "queued",
                                                                        b_queued))
        c_future = c.submit("run", "def g():", on_event=_events_until(c_events, "queued",
                                                                        c_queued))
        assert b_queued.wait(60) and c_queued.wait(60)
        # b and c arrive on different connections: either may be queued first
        assert {b_events[0]["position"], c_events[0]["position"]} == {1, 2}
        # a's call is running: position 1 still has one request ahead of it
        assert {b_events[0]["ahead"], c_events[0]["ahead"]} == {1, 2}
        second = b_events if b_events[0]["position"] == 2 else c_events
        HOLD.set()
        busy.result(timeout=60)
        b_future.result(timeout=60)
        c_future.result(timeout=60)
        assert {"type": "started"} in b_events and {"type": "started"} in c_events
        # moved up when the first started: next in line, behind the one now running
        assert {"type": "queued", "position": 1, "ahead": 1} in second


def test_a_long_dataset_run_yields_to_other_sessions_between_batches(server):
    texts = [f"x = {i}" for i in range(40)]
    with cloche.connect(server.address, token=server.token) as long, \
            cloche.connect(server.address, token=server.token) as short:
        started = threading.Event()
        run = long.submit("run_dataset", texts, probes={"embed": one_batch_per_permit},
                          batch_size=1, save="long",
                          on_event=lambda e: e.get("type") == "started" and started.set())
        assert started.wait(60)
        queued = threading.Event()
        events: list[dict] = []
        answer = short.submit("run", "y = 1", on_event=_events_until(events, "queued", queued))
        assert queued.wait(60)  # waiting behind the dataset run, whose first batch is held
        PERMITS.release()  # one batch: then the short request is served, before batch two
        assert answer.result(timeout=60).logits.shape[0] == 1
        assert not run.done()  # the dataset run is still going (batch two has no permit)
        for _ in texts:
            PERMITS.release()
        assert run.result(timeout=120)["examples"] == 40


def busy_for(model, seconds, start_threads=False):
    """Keep the worker busy in Python for ``seconds`` (optionally starting threads)."""
    import threading as t
    import time as tm

    end, n = tm.monotonic() + seconds, 0
    while tm.monotonic() < end:
        if start_threads:
            worker = t.Thread(target=lambda: None)
            worker.start()
            worker.join()
        n += 1
    return n


@pytest.mark.parametrize("start_threads", [False, True])
def test_a_cancelled_run_never_interrupts_the_request_served_inside_it(server, start_threads):
    """Session A's dataset run is cancelled while the worker serves session B between two of
    A's batches: B finishes normally (before, A's interrupt landed in B's code — or, if B was
    starting a thread, in that thread, and the worker hung for good)."""
    texts = [f"x = {i}" for i in range(8)]
    with cloche.connect(server.address, token=server.token) as a, \
            cloche.connect(server.address, token=server.token) as b, \
            cloche.connect(server.address, token=server.token) as c:
        started = threading.Event()
        run = a.submit("run_dataset", texts, probes={"embed": one_batch_per_permit},
                       batch_size=1, save="cancelled-a",
                       on_event=lambda e: e.get("type") == "started" and started.set())
        assert started.wait(60)
        b_started, b_queued = threading.Event(), threading.Event()

        def on_b(event):
            if event.get("type") == "queued":
                b_queued.set()
            if event.get("type") == "started":
                b_started.set()

        # B runs well past the grace period after A's cancel
        b_call = b.submit("call", busy_for, 3.0, start_threads, on_event=on_b)
        assert b_queued.wait(60)
        PERMITS.release()  # A's first batch ends; B is served before A's second batch
        assert b_started.wait(60)
        assert run.cancel()
        assert b_call.result(timeout=120) > 0  # not Cancelled
        for _ in texts:
            PERMITS.release()
        assert c.run("z = 1").logits.shape[0] == 1  # and the worker serves on
        assert "cancelled-a" not in a.save_contexts()
    while PERMITS.acquire(blocking=False):  # leave no permits for the next test
        pass
