"""A ``--serve`` function for the two-namespace torchrun test: run fixed checks, save, return.

Rank 0 calls ``serve(model)`` with a cloche.Model over the sharded executor; returning shuts
every rank down. The results go to the file named by CLOCHE_NETNS_OUT (read here, at this test
entry point).
"""

from __future__ import annotations

import os

import torch

from tests.sharding.conftest import ids_batch


def _saver(ctx, x):
    ctx.save(ctx.point, x)


def serve(model) -> None:
    inputs = ids_batch(seed=11)
    last = f"layers.{model.n_layers - 1}.mlp.post"
    result = model.run(inputs, probes={last: _saver, "layers.0.resid_post": _saver},
                       grad_probes={"layers.1.resid_pre": _saver}, backward=True, save="n")
    handle = model.save_context("n")
    out = {
        "world_size": model.world_size,
        "owners": {p: model.owner_of(p) for p in (last, "layers.0.resid_post")},
        "logits": result.logits,
        "loss": result.loss,
        "saved": {k: handle.fetch(k) for k in handle.keys()},  # noqa: SIM118 - not a dict
        "grad_W_in": model.param("layers.3.mlp.W_in", grad=True),
        "tokens": model.generate(torch.tensor([5, 17, 42]), 5).tokens,
    }
    torch.save(out, os.environ["CLOCHE_NETNS_OUT"])


def ping(model) -> None:
    """Answer one command on every rank, then return (the shutdown is what is under test)."""
    assert model.executor.ping_ranks() == list(range(model.world_size))


def _reducers(ctx, x):
    """Per-point statistics (each lives on one rank, so no cross-rank merge reorders sums)."""
    import cloche

    ctx.reduce(f"mean:{ctx.point}", x, cloche.Mean())
    ctx.reduce(f"top:{ctx.point}", x[..., :4], cloche.TopK(3))


def dataset_examples() -> list[list[int]]:
    """A small dataset of token ids of uneven lengths (padding is exercised)."""
    g = torch.Generator().manual_seed(5)
    return [torch.randint(3, 90, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 12, (10,), generator=g)]


def everything(model) -> dict:
    """Logits, every canonical probe point, gradients (activations and weights) and reducers
    over a dataset: the run that world size 8 must reproduce bit for bit."""
    from cloche.data import Dataset

    names = [p.name for p in model.probe_points() if not p.name.startswith("module:")]
    layers = range(model.n_layers)
    result = model.run(ids_batch(seed=11), probes=dict.fromkeys(names, _saver),
                       grad_probes={f"layers.{i}.resid_pre": _saver for i in layers},
                       backward=True, save="all")
    handle = model.save_context("all")
    weights = ["embed.W_E", "unembed.W_U", *(f"layers.{i}.mlp.W_in" for i in layers),
               *(f"layers.{i}.attn.W_Q" for i in layers)]
    out = {
        "names": names,
        "logits": result.logits,
        "loss": result.loss,
        "saved": {k: handle.fetch(k) for k in handle.keys()},  # noqa: SIM118 - not a dict
        "grads": {w: model.param(w, grad=True) for w in weights},
    }
    data = Dataset(dataset_examples(), name="eight", seq_len=12, pad_id=2)
    model.run_dataset(data, probes={f"layers.{i}.resid_post": _reducers for i in layers},
                      save="red", batch_size=4, progress=False)
    red = model.save_context("red")
    out["reducers"] = {name: red.result(name) for name in sorted(red.reducers())}
    return out


def serve_eight(model) -> None:
    """World size 8 over four namespaces: save :func:`everything`, say so through the FIFO
    named by CLOCHE_NETNS_READY, then keep pinging every rank until one is lost (the test kills
    a node) — the WorkerLost reaches this process's log through the launcher."""
    import threading

    from cloche.errors import WorkerLost

    out = everything(model)
    out["world_size"] = model.world_size
    out["plan"] = model.info()["layers_per_rank"]
    out["owners"] = {name: model.owner_of(name) for name in out["names"]}
    torch.save(out, os.environ["CLOCHE_NETNS_OUT"])
    with open(os.environ["CLOCHE_NETNS_READY"], "w") as fifo:
        fifo.write("saved\n")
    pause = threading.Event()
    while True:
        try:
            model.executor.ping_ranks()
        except WorkerLost as exc:
            print(f"serve_eight saw WorkerLost: {exc}", flush=True)
            return
        pause.wait(0.25)  # a liveness poll, not a synchronisation: the loss can come any time
