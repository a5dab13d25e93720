"""One model API: ``cloche.load``, ``cloche.connect`` and a sharded launch give the same class,
with the same arguments reaching every executor, and the executors share one seam."""

from __future__ import annotations

import inspect
import threading
import time

import cloche
import pytest
import torch
from cloche.api.executor import Executor
from cloche.client.executor import RemoteExecutor
from cloche.runtime.executor import LocalExecutor
from cloche.server.session_executor import SessionExecutor
from cloche.sharding.executor import ShardedExecutor
from cloche.sharding.launch import start_local

from tests.server.helpers import InProcessServer
from tests.sharding.conftest import save_tiny4
from tests.threads import TORCH_THREADS

IDS = torch.arange(3, 27).reshape(2, 12)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory):
    return save_tiny4("gpt2", tmp_path_factory.mktemp("api-gpt2"))


@pytest.fixture(scope="module")
def models(tiny4):
    """kind -> the same tiny model, in this process, behind a server, and over 2 ranks."""
    local = cloche.load(tiny4)
    server = InProcessServer(cloche.load(tiny4))
    remote = cloche.connect(server.address, token=server.token)
    sharded = start_local(tiny4, 2, timeout_s=30.0, threads=TORCH_THREADS)
    try:
        yield {"local": local, "remote": remote, "sharded": sharded}
    finally:
        remote.close()
        server.server.shutdown()
        sharded.close()


KINDS = ["local", "remote", "sharded"]


def test_every_front_door_returns_the_one_model_class(models):
    assert {type(m) for m in models.values()} == {cloche.Model}
    executors = [m.executor for m in models.values()]
    assert [type(e) for e in executors] == [LocalExecutor, RemoteExecutor, ShardedExecutor]


def test_every_executor_satisfies_the_seam(models):
    session = SessionExecutor(models["local"].executor, _session())
    for executor in [*(m.executor for m in models.values()), session]:
        assert isinstance(executor, Executor), type(executor).__name__
        for method in ("execute", "submit"):
            want = inspect.signature(getattr(Executor, method))
            got = inspect.signature(getattr(type(executor), method))
            assert list(got.parameters) == list(want.parameters), (type(executor), method)
            assert [p.kind for p in got.parameters.values()] == \
                [p.kind for p in want.parameters.values()]


def _session():
    from cloche.server.sessions import Session

    return Session("0" * 32)


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_results_everywhere(models, kind):
    model, local = models[kind], models["local"]

    def keep(ctx, x):
        ctx.save("x", x)

    got = model.run(IDS, probes={"layers.2.mlp.post": keep}, save="same")
    want = local.run(IDS, probes={"layers.2.mlp.post": keep}, save="same")
    # bit for bit: every side runs TORCH_THREADS threads, and a sharded rank the same ops
    assert torch.equal(got.logits, want.logits)
    assert torch.equal(model.save_context("same").fetch("x"), local.save_context("same").fetch("x"))
    grads = {}
    for name, m in (("got", model), ("want", local)):
        grads[name] = m.run(IDS, grad_probes={"layers.1.resid_post": keep}, backward=True,
                            save="grad").logits
    assert torch.equal(grads["got"], grads["want"])
    assert torch.equal(model.save_context("grad").fetch("x"), local.save_context("grad").fetch("x"))
    assert model.info()["world_size"] == (2 if kind == "sharded" else 1)
    for m in (model, local):
        m.save_context("same").clear()
        m.save_context("grad").clear()


def _counted(executor, monkeypatch) -> list:
    """The requests ``executor`` executes from now on (until ``monkeypatch.undo()``)."""
    calls, execute = [], executor.execute

    def counting(request, **kwargs):
        calls.append(request)
        return execute(request, **kwargs)

    monkeypatch.setattr(executor, "execute", counting)
    return calls


@pytest.mark.parametrize("kind", KINDS)
def test_fetch_all_reads_the_keys_in_one_request_as_fetch_does(models, kind, monkeypatch):
    """Keys saved on the first and the last block (both ranks when sharded), and one key saved on
    both: ``fetch_all`` equals a ``fetch`` per key in every mode, in one request."""
    model = models[kind]

    def keep(name):
        def probe(ctx, x):
            ctx.save(name, x)
            ctx.save("both", x[:, :2, :8])
        return probe

    probes = {"layers.0.resid_post": keep("first"), "layers.3.mlp.post": keep("last")}
    model.run(IDS, probes=probes, save="many", return_logits=False)
    model.run(IDS.flip(0), probes=probes, save="many", return_logits=False)
    handle = model.save_context("many")
    try:
        for mode in ("stack", "list"):
            want = {key: handle.fetch(key, mode) for key in ("both", "first", "last")}
            calls = _counted(model.executor, monkeypatch)
            got = handle.fetch_all(mode=mode)
            monkeypatch.undo()
            assert len(calls) == 1 and list(got) == ["both", "first", "last"]
            for key, value in want.items():
                if mode == "list":
                    assert all(torch.equal(a, b) for a, b in zip(got[key], value, strict=True))
                else:
                    assert torch.equal(got[key], value), key
        some = handle.fetch_all(["last", "first"], mode="cat")
        assert list(some) == ["last", "first"]
        assert torch.equal(some["last"], handle.fetch("last", "cat"))
        with pytest.raises(cloche.UsageError, match="no key"):
            handle.fetch_all(["first", "nowhere"])
        with pytest.raises(cloche.UsageError, match="fetch mode"):
            handle.fetch_all(mode="sideways")
        assert handle.keys() == ["both", "first", "last"]  # the refusals lost nothing
    finally:
        handle.clear()


@pytest.mark.parametrize("kind", KINDS)
def test_micro_batches_reach_every_executor(models, kind):
    """An argument of ``run`` is one field of one request: it reaches local, remote and sharded
    execution alike (probes then run once per micro-batch)."""
    model = models[kind]

    def count(ctx, x):
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        ctx.save("rows", torch.tensor(x.shape[0]))

    whole = model.run(IDS, probes={"layers.3.resid_post": count}, save="mb", micro_batches=1)
    split = model.run(IDS, probes={"layers.3.resid_post": count}, save="mb", micro_batches=2)
    handle = model.save_context("mb")
    assert handle.state["calls"] == 3
    assert handle.fetch("rows").tolist() == [2, 1, 1]
    torch.testing.assert_close(split.logits, whole.logits, atol=1e-5, rtol=0)
    handle.clear()
    with pytest.raises(cloche.UsageError, match="micro_batches"):
        model.run(IDS, micro_batches=0)


@pytest.mark.parametrize("kind", KINDS)
def test_call_routes_by_rank_everywhere(models, kind):
    model = models[kind]
    world = model.world_size
    assert model.call(lambda m, a: (m.rank, a), 7) == (0, 7)
    assert model.call(lambda m: m.rank, rank="all") == {r: r for r in range(world)}
    assert model.call(lambda m: m.rank, rank=world - 1) == world - 1
    with pytest.raises(cloche.UsageError, match="rank must be"):
        model.call(lambda m: m.rank, rank=world)


@pytest.mark.parametrize("kind", KINDS)
def test_validation_happens_before_anything_runs(models, kind):
    model = models[kind]
    with pytest.raises(cloche.UnknownProbePoint, match="did you mean"):
        model.run(IDS, probes={"layers.0.mlp.psot": lambda c, x: None})
    with pytest.raises(cloche.UsageError, match="need a backward pass"):
        model.run(IDS, grad_probes={"embed": lambda c, g: None})
    with pytest.raises(cloche.UsageError, match="not callable"):
        model.run(IDS, probes={"embed": 3})
    with pytest.raises(cloche.UsageError, match="save context names"):
        model.save_context("")
    with pytest.raises(cloche.UsageError, match="submit takes"):
        model.submit("no_such_method")
    assert "default" not in model.save_contexts()


# Module-level, so that probes referring to them ship by reference (the other ranks of a sharded
# model import this module; the probe that waits runs on rank 0, in this process).
ENTERED, RELEASE = threading.Event(), threading.Event()


def _hold(ctx, x):
    """In this process: say the run reached this point, then wait until the test says go."""
    ENTERED.set()
    RELEASE.wait(30)


def _hold_until_cancelled(ctx, x):
    """On a server: wait until the request is cancelled (its next layer then stops it)."""
    deadline = time.monotonic() + 30
    while not ctx.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)


def _keep(ctx, x):
    ctx.save("x", x)


@pytest.mark.parametrize("kind", KINDS)
def test_submit_gives_a_future_whose_cancel_stops_a_running_request(models, kind):
    model = models[kind]
    ENTERED.clear()
    RELEASE.clear()
    if kind == "remote":  # the probe runs on the server: the test learns it started from events
        started = threading.Event()
        future = model.submit("run", IDS, probes={"layers.0.resid_post": _hold_until_cancelled,
                                                  "layers.3.resid_post": _keep},
                              save="cancelled",
                              on_event=lambda e: e["type"] == "started" and started.set())
        assert started.wait(30)
        assert future.cancel()
    else:
        future = model.submit("run", IDS, probes={"layers.0.resid_post": _hold,
                                                  "layers.3.resid_post": _keep},
                              save="cancelled")
        assert ENTERED.wait(30)
        assert future.cancel()
        RELEASE.set()
    assert isinstance(future, cloche.RequestFuture) and future.cancelled()
    # the cancelled run wrote nothing, and the model serves the next request
    assert model.submit("run", IDS).result(timeout=60).logits.shape[:2] == (2, 12)
    assert "cancelled" not in model.save_contexts()


@pytest.mark.parametrize("kind", KINDS)
def test_a_probe_that_cannot_travel_is_a_clear_error_and_the_model_serves_on(models, kind):
    lock = threading.Lock()

    def uses_a_lock(ctx, x):
        assert not lock.locked()

    if kind == "local":  # nothing travels: any probe will do
        models[kind].run(IDS, probes={"embed": uses_a_lock})
        return
    with pytest.raises(cloche.UsageError, match="lock"):
        models[kind].run(IDS, probes={"layers.3.resid_post": uses_a_lock})
    assert models[kind].run(IDS).logits.shape[:2] == (2, 12)


@pytest.mark.parametrize("kind", KINDS)
def test_the_underlying_module_is_reachable_only_where_it_runs(models, kind):
    model = models[kind]
    if kind == "local":
        assert isinstance(model.hf_model, torch.nn.Module)
    else:
        with pytest.raises(cloche.UsageError, match=r"model\.call"):
            model.hf_model  # noqa: B018 - the access is the test
    n_params = sum(p.numel() for p in models["local"].hf_model.parameters())
    shard = 0 if kind == "sharded" else None
    counted = model.call(lambda m: sum(p.numel() for p in m.hf_model.parameters()), rank=shard)
    assert counted == n_params if kind != "sharded" else 0 < counted < n_params


@pytest.mark.parametrize("kind", KINDS)
def test_example_ids_number_the_rows_of_plain_runs_everywhere(models, kind):
    """A TopK reducer in a plain run needs example ids: every executor numbers the rows of a
    save context's plain runs alike (0, 1, 2, ... across runs). Before, a sharded run gave none."""
    model, local = models[kind], models["local"]

    def top(ctx, x):
        ctx.reduce("top", x[:, -1], cloche.TopK(3))

    both = [model] if model is local else [model, local]
    for m in both:
        m.run(IDS, probes={"layers.3.resid_post": top}, save="ids")
        m.run(IDS + 1, probes={"layers.3.resid_post": top}, save="ids")
    got, want = model.save_context("ids").result("top"), local.save_context("ids").result("top")
    assert torch.equal(got["example_ids"], want["example_ids"])
    assert set(got["example_ids"].flatten().tolist()) <= {0, 1, 2, 3}
    torch.testing.assert_close(got["values"], want["values"], atol=1e-5, rtol=0)
    for m in both:
        m.save_context("ids").clear()


def test_a_batched_generate_returns_one_text_per_prompt():
    model = cloche.load()  # the shipped model has a tokenizer
    prompts = ["def add(a, b):", "import os\nimport"]
    batch = model.generate(prompts, 5)
    assert isinstance(batch.text, list) and isinstance(batch.new_text, list)
    assert batch.tokens.shape[0] == 2
    for prompt, text, new in zip(prompts, batch.text, batch.new_text, strict=True):
        assert text == prompt + new, (text, prompt, new)  # padding left out
    one = model.generate(prompts[0], 5)
    assert isinstance(one.text, str) and one.text == prompts[0] + one.new_text
