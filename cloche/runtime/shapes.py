"""Discovering the shape of every probe point with one tiny forward pass.

Shapes are reported symbolically: the batch and sequence dimensions of the probe input are
named ``"batch"`` and ``"seq"``, everything else is a number.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BATCH", "SEQ", "probe_ids", "shape_reader"]

BATCH, SEQ = 2, 7


def probe_ids(vocab: int) -> torch.Tensor:
    """The ``(BATCH, SEQ)`` token ids of the discovery pass."""
    return torch.arange(SEQ).remainder(max(vocab, 1)).repeat(BATCH, 1)


def shape_reader(seen: dict[str, tuple[str | int, ...]]) -> Callable[[Any, torch.Tensor], None]:
    """A probe that records the symbolic shape of ``x`` under its point's name in ``seen``."""

    def reader(ctx: Any, x: torch.Tensor) -> None:
        dims: list[str | int] = []
        for i, d in enumerate(x.shape):
            dims.append("batch" if i == 0 and d == BATCH else "seq" if d == SEQ else int(d))
        seen[ctx.point] = tuple(dims)

    return reader
