"""A probe stuck in a Python loop on another rank is stopped by a cancel, like a local one."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch


def spin_forever(ctx, x):  # module level: ships by reference to the other rank
    while True:
        pass


@pytest.fixture(scope="module")
def group(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 2, timeout_s=TIMEOUT_S, threads=1)
    try:
        yield cloche.load(tiny4_dir("gpt2")), model
    finally:
        model.close()


@pytest.mark.parametrize(("point", "rank"), [("layers.0.mlp.out", 0), ("layers.3.mlp.out", 1)])
def test_cancel_stops_a_probe_stuck_on_any_rank(group, point, rank):
    local, model = group
    assert model.owner_of(point) == rank
    future = model.submit("run", ids_batch(), probes={point: spin_forever}, save="stuck")
    assert future.cancel()
    # served again: the loop on rank `rank` was interrupted, every rank rolled back
    torch.testing.assert_close(model.run(ids_batch()).logits, local.run(ids_batch()).logits,
                               atol=1e-5, rtol=0)
    assert model.executor.ping_ranks() == [0, 1]
    assert "stuck" not in model.save_contexts()
