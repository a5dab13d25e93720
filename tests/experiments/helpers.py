"""Brute-force references for the experiment tests: plain runs, one example at a time."""

from __future__ import annotations

import torch


def random_dataset(model, n: int = 12, seed: int = 0, min_len: int = 6, max_len: int = 20):
    """A dataset of random token ids with varied lengths (so batches carry padding)."""
    from cloche import data

    gen = torch.Generator().manual_seed(seed)
    low = 3
    rows = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=gen))
        rows.append(torch.randint(low, int(model.d_vocab), (length,), generator=gen).tolist())
    return data.Dataset(rows, name=f"random-{seed}", seq_len=max_len, pad_id=1)


def activations_by_example(model, point: str, dataset) -> list[torch.Tensor]:
    """Brute force, one example per run: the (seq, ...) activations at ``point`` of each one."""
    out = []
    name = "test/brute"
    try:
        for i in range(len(dataset)):
            model.run(dataset[i], probes={point: lambda c, x: c.save("x", x[0])}, save=name)
        out = model.save_context(name).fetch("x", mode="list")
    finally:
        model.save_context(name).clear()
    return out
