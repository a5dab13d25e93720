"""Families with their own quirks, sharded over 2 gloo ranks, give what one process gives.

OPT (flattened MLP sites, offset positions), Gemma 2 (scaled embeddings, soft-capped attention
and logits at the model's output, sliding window), Phi-3 (points that are chunks of a fused
output), Falcon (parallel blocks, an MLP output edited in place), BLOOM (blocks that return
tuples, ALiBi) and Mixtral and Qwen2-MoE (router and tapped experts; their checkpoints hold the
experts one by one, as transformers saves them), each with 4 blocks so that both ranks hold two.
"""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS
from tests.tiny_models import save_tiny

ATOL = 1e-5
FAMILIES = ["opt", "gemma2", "phi3", "falcon", "bloom", "mixtral", "qwen2_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    directory = save_tiny(request.param, tmp_path_factory.mktemp(f"{request.param}4"), n_layers=4)
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()


def saver(ctx, x):
    ctx.save(ctx.point, x)


def test_every_canonical_point_logits_and_gradients_agree(pair):
    local, dist = pair
    names = [p.name for p in local.probe_points() if not p.name.startswith("module:")]
    assert [p.name for p in dist.probe_points() if not p.name.startswith("module:")] == names
    assert {dist.owner_of(n) for n in names} == {0, 1}
    inputs = ids_batch(seed=2)
    for model in (local, dist):
        model.save_context("all").clear()
        model.run(inputs, probes=dict.fromkeys(names, saver), save="all")
    want, got = local.save_context("all"), dist.save_context("all")
    assert got.keys() == want.keys() == sorted(names)
    for name in names:
        torch.testing.assert_close(got.fetch(name), want.fetch(name), atol=ATOL, rtol=0)
    want.clear()
    got.clear()
    torch.testing.assert_close(dist.run(inputs).logits, local.run(inputs).logits, atol=ATOL,
                               rtol=0)
    grad_probes = {f"layers.{i}.resid_pre": saver for i in range(local.n_layers)}
    for model in (local, dist):
        model.save_context("g").clear()
        model.run(inputs, grad_probes=grad_probes, backward=True, save="g")
    for name in grad_probes:
        torch.testing.assert_close(dist.save_context("g").fetch(name),
                                   local.save_context("g").fetch(name), atol=ATOL, rtol=1e-5)
    local.save_context("g").clear()
    dist.save_context("g").clear()


def test_canonical_weights_agree(pair):
    """Every canonical weight (per-head attention, Falcon's fused q/k/v, each expert's
    W_gate/W_in/W_out) is read from the rank that holds it, as one process reads it."""
    local, dist = pair
    raw = set(local.param_names(canonical=False))
    names = [n for n in local.param_names() if n not in raw]
    assert [n for n in dist.param_names() if n not in raw] == names
    for name in names:
        torch.testing.assert_close(dist.param(name), local.param(name), atol=0, rtol=0, msg=name)
