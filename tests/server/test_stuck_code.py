"""User code stuck in a Python loop is stoppable: a cancel, or the server's request timeout,
interrupts it at a bytecode boundary, the run is rolled back, and the server serves on.

Before, the client was told "cancelled" at once while the server kept running the loop, and
every later request waited behind it forever (a ``while True`` needed a restart).
"""

from __future__ import annotations

import threading

import cloche
import pytest
import torch

from tests.server.helpers import InProcessServer, hook_count


def spin_forever(model):
    while True:
        pass


def spinning_probe(ctx, x):
    ctx.save("before", x[:, :1])
    while True:
        pass


def started(model, method, *args, **kwargs):
    """Submit, and return the future once the server reports the request started."""
    event = threading.Event()
    future = model.submit(method, *args, **kwargs,
                          on_event=lambda e: e.get("type") == "started" and event.set())
    assert event.wait(60), "the request never started"
    return future


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir)


@pytest.mark.parametrize("stuck", ["call", "probe"])
def test_cancel_stops_user_code_stuck_in_a_loop(local_model, stuck):
    with InProcessServer(local_model) as server, \
            cloche.connect(server.address, token=server.token) as model:
        if stuck == "call":
            future = started(model, "call", spin_forever)
        else:
            future = started(model, "run", "def f():", probes={"embed": spinning_probe},
                             save="stuck")
        assert future.cancel()
        # the next request is served: the loop was stopped, not left running
        assert model.run("x = 1").logits.shape[0] == 1
        assert "stuck" not in model.save_contexts()  # rolled back
        assert hook_count(model) == 0


def test_the_request_timeout_stops_a_runaway_request(local_model):
    with InProcessServer(local_model, request_timeout=1.0) as server, \
            cloche.connect(server.address, token=server.token) as model:
        with pytest.raises(cloche.Cancelled, match="request-timeout"):
            model.call(spin_forever)
        with pytest.raises(cloche.Cancelled, match="request-timeout"):
            model.run("def f():", probes={"embed": spinning_probe}, save="stuck")
        assert "stuck" not in model.save_contexts()
        assert hook_count(model) == 0
        assert model.call(lambda m: m.n_layers) == local_model.n_layers


def test_a_local_future_cancel_stops_a_stuck_probe(local_model):
    future = local_model.submit("run", "def f():", probes={"embed": spinning_probe},
                                save="stuck-local")
    assert future.cancel()
    # the model is usable again once the stuck run is interrupted (it holds the model's lock)
    out = local_model.run("x = 1")
    assert torch.isfinite(out.logits).all()
    assert "stuck-local" not in local_model.save_contexts()
