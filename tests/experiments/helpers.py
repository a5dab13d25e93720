"""Brute-force references for the experiment tests: plain runs, one example at a time."""

from __future__ import annotations

import torch

SEQ = 6  # the length of :func:`pair`'s sequences


def pair(model, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A clean batch of random tokens and a corrupted copy (positions 1 and 3 resampled): the
    pair the patching and attribution tests compare."""
    gen = torch.Generator().manual_seed(21)
    clean = torch.randint(3, model.d_vocab, (batch, SEQ), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 1] = torch.randint(3, model.d_vocab, (batch,), generator=gen)
    corrupted[:, 3] = torch.randint(3, model.d_vocab, (batch,), generator=gen)
    return clean, corrupted


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
