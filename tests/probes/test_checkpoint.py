"""Checkpoints keep enough history that a sharded run's ranks can agree on a common one."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.probes.checkpoint import Checkpoint, Checkpoints
from cloche.probes.store import SaveStore


def checkpoint_after(writes, n: int) -> Checkpoint:
    """One more batch saved and reduced, checkpointed after example ``n``."""
    x = torch.full((2, 3), float(n))
    writes.save("rows", x)
    writes.reduce("mean", x, cloche.Mean(), example_ids=None, mask=None)
    return Checkpoint.of(writes, {"run": 1}, n, {"examples": n, "tokens": 3 * n})


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_an_earlier_checkpoint_is_restored_and_becomes_the_last(tmp_path, on_disk):
    store = Checkpoints(tmp_path / "runs" if on_disk else None)
    writes = SaveStore().begin().writes("c")
    for i, n in enumerate((2, 4, 6)):
        store.write("c", checkpoint_after(writes, n), first=i == 0)
    assert store.available("c") == ([2, 4, 6] if on_disk else [4, 6])
    ckpt = store.read("c", at=4)
    assert ckpt is not None and ckpt.next_example == 4
    assert [float(v[0, 0]) for v in ckpt.pending.entries["rows"]] == [2.0, 4.0]
    assert store.available("c") == ([2, 4] if on_disk else [4])
    assert store.read("c", at=6) is None  # dropped: no resume from a checkpoint not kept

    fresh = SaveStore().begin().writes("c")  # the resumed run goes on from example 4
    ckpt.restore(fresh)
    store.write("c", checkpoint_after(fresh, 8), first=False)
    last = store.read("c")
    assert last is not None and last.next_example == 8
    assert [float(v[0, 0]) for v in last.pending.entries["rows"]] == [2.0, 4.0, 8.0]
    mean = last.pending.reducers["mean"].result()["mean"]
    torch.testing.assert_close(mean, torch.full((3,), 14.0 / 3, dtype=mean.dtype))  # 2, 4, 8
