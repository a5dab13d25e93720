"""The ``ctx`` a probe receives: where it runs, on what, and where it may write.

A probe is ``fn(ctx, x)``: ``x`` is the tensor at the probe point and the return value is
``None`` (keep ``x``) or a replacement tensor, following PyTorch's hook convention. Through
``ctx`` the probe reaches its run's save context: ``ctx.save`` appends, ``ctx.state`` is a free
dict that persists across runs, ``ctx.reduce`` feeds a mergeable statistic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cloche.probes.reducers import Reducer
from cloche.probes.store import PendingWrites


@dataclass
class RunInfo:
    """What every probe of one forward pass shares."""

    writes: PendingWrites
    tokens: torch.Tensor | None
    attention_mask: torch.Tensor | None
    example_ids: torch.Tensor | None
    model: Any
    rank: int = 0
    cancel: Any = None  # the run's cancellation event (anything with is_set()), if any


class ProbeContext:
    """Handed to each probe call; cheap to make (one per point per forward pass)."""

    __slots__ = ("_run", "layer", "point")

    def __init__(self, run: RunInfo, point: str, layer: int | None) -> None:
        self._run = run
        self.point = point
        self.layer = layer

    def at(self, point: str) -> ProbeContext:
        """A context for another point of the same run (a point derived from this one)."""
        return ProbeContext(self._run, point, self.layer)

    @property
    def run_index(self) -> int:
        """How many runs this save context had committed before this one."""
        return self._run.writes.run_index

    @property
    def tokens(self) -> torch.Tensor | None:
        """Token ids of the forward pass, ``(batch, seq)`` (during generation: this step's)."""
        return self._run.tokens

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self._run.attention_mask

    @property
    def example_ids(self) -> torch.Tensor | None:
        """Ids of the batch rows: dataset example ids in dataset runs; otherwise the running
        count of rows this save context has seen in plain runs (0, 1, 2, ... across runs)."""
        return self._run.example_ids

    @property
    def model(self) -> Any:
        return self._run.model

    @property
    def rank(self) -> int:
        return self._run.rank

    @property
    def cancelled(self) -> bool:
        """Whether the run was cancelled: a long loop inside a probe can stop early."""
        cancel = self._run.cancel
        return bool(cancel is not None and cancel.is_set())

    @property
    def state(self) -> dict[str, Any]:
        """A free dict that persists across runs of the save context."""
        return self._run.writes.state

    def save(self, key: str, value: Any) -> None:
        """Append ``value`` under ``key`` (kept as a tensor where it was made, until fetched)."""
        self._run.writes.save(key, value)

    def reduce(self, name: str, x: torch.Tensor, reducer: Reducer | None = None) -> None:
        """Feed ``x`` (``(..., units)``) to the statistic ``name``, created from ``reducer``.

        Padding is left out automatically when ``x`` starts with the batch's ``(batch, seq)``
        shape; dataset runs pass each row's example id (for top-k examples). Returns None, so
        ``lambda ctx, x: ctx.reduce(...)`` is a valid probe.
        """
        mask = None
        am = self._run.attention_mask
        if am is not None and x.dim() >= 3 and tuple(x.shape[:2]) == tuple(am.shape):
            mask = am.to(torch.bool)
        ids = self._run.example_ids
        if ids is not None and (x.dim() < 2 or x.shape[0] != ids.shape[0]):
            ids = None
        self._run.writes.reduce(name, x, reducer, example_ids=ids, mask=mask)

    def __repr__(self) -> str:
        return f"ProbeContext(point={self.point!r}, run_index={self.run_index})"
