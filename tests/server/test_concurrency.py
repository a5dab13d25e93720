"""Several clients at once: fair queueing, queue positions, light requests never stuck, and
nothing leaking between sessions."""

from __future__ import annotations

import threading
import uuid

import cloche
import pytest
import torch
from cloche.client import connect

from tests.server.test_cancel import ENDLESS, save_everything

TEXTS = ["def add(a, b):", "for i in range(3):", "import os", "class P:", "while x:",
         "print(1)", "x = y", "return z"]


@pytest.fixture(scope="module")
def local(server_model_dir):
    return cloche.load(server_model_dir)


def test_eight_concurrent_clients_see_only_their_own_data(served, local):
    shared = f"shared/all-{uuid.uuid4().hex[:8]}"
    points = ["layers.0.mlp.post", "layers.1.resid_post", "layers.0.attn.pattern", "embed"]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def client(i: int) -> None:
        try:
            with connect(served.address, token=served.token) as m:
                def mine(ctx, x, i=i):
                    ctx.save("mine", torch.full((2,), float(i)))
                    ctx.state["owner"] = i

                def scale(ctx, x, i=i):
                    return x * (1 + i / 10)

                barrier.wait()
                for _ in range(3):
                    m.run(TEXTS[i], probes={points[i % 4]: mine}, save="acts")
                m.run("shared", probes={"embed": mine}, save=shared)
                results[i] = {
                    "mine": m.save_context("acts").fetch("mine"),
                    "state": m.save_context("acts").state,
                    "contexts": m.save_contexts(),
                    "patched": m.run(TEXTS[i], probes={points[i % 4]: scale}).logits,
                }
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        r = results[i]
        assert torch.equal(r["mine"], torch.full((3, 2), float(i)))
        assert r["state"] == {"owner": i}
        assert "acts" in r["contexts"] and shared in r["contexts"]
        assert not any(name.startswith(("s/", "p/")) for name in r["contexts"])

        def scale(ctx, x, i=i):
            return x * (1 + i / 10)

        assert torch.equal(r["patched"],
                           local.run(TEXTS[i], probes={points[i % 4]: scale}).logits)
    with connect(served.address, token=served.token) as m:
        values = m.save_context(shared).fetch("mine", mode="cat")
        assert sorted(values[::2].tolist()) == [float(i) for i in range(8)]
        assert "acts" not in m.save_contexts()  # a fresh session has none of theirs
        m.save_context(shared).clear()


def test_light_requests_are_not_stuck_behind_a_long_run(served):
    with connect(served.address, token=served.token) as busy, \
            connect(served.address, token=served.token) as light:
        running = threading.Event()
        future = busy.submit("run_dataset", ENDLESS,
                             probes={"layers.0.mlp.post": save_everything},
                             save="long", batch_size=1,
                             progress=lambda u: u["type"] == "progress" and running.set())
        assert running.wait(60)
        assert light.param("embed.W_E").shape[1] == light.d_model
        assert isinstance(light.save_contexts(), list)
        assert light.probe_points()
        assert light.save_context("nothing").keys() == []
        assert not future.done()  # all of the above answered while the run was going
        future.cancel()
