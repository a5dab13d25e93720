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
