"""The sharding plan: which contiguous range of transformer blocks each rank owns.

Kept apart from the code that applies it (``sharding.shard``) and from everything that runs on it,
so another plan (tensor parallelism, uneven placement) can be added without touching probes or
the server. Rank 0 always holds the embeddings, the last rank the final norm and unembedding;
blocks are balanced by parameter count, counting the embedding and unembedding matrices on the
ranks that hold them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cloche.errors import UsageError

__all__ = ["ShardPlan", "balanced_plan", "plan_from_counts"]


@dataclass(frozen=True, kw_only=True)
class ShardPlan:
    """``ranges[r]`` is the half-open range of block indices that rank ``r`` owns."""

    n_layers: int
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise UsageError("a shard plan needs at least one rank")
        expected = 0
        for rank, (start, stop) in enumerate(self.ranges):
            if start != expected or stop <= start:
                raise UsageError(f"rank {rank} owns blocks [{start}, {stop}): every rank needs at"
                                 f" least one block, in order, starting at {expected}")
            expected = stop
        if expected != self.n_layers:
            raise UsageError(f"the plan covers {expected} blocks, the model has {self.n_layers}")

    @property
    def world_size(self) -> int:
        return len(self.ranges)

    @property
    def last(self) -> int:
        return len(self.ranges) - 1

    def owner_of_layer(self, layer: int) -> int:
        """The rank that owns block ``layer``."""
        for rank, (start, stop) in enumerate(self.ranges):
            if start <= layer < stop:
                return rank
        raise UsageError(f"layer {layer} is out of range (the model has {self.n_layers} blocks)")

    def layers_per_rank(self) -> list[int]:
        return [stop - start for start, stop in self.ranges]


def plan_from_counts(n_layers: int, layers_per_rank: Sequence[int]) -> ShardPlan:
    """The plan for an explicit ``--layers-per-rank`` list (validated, errors name the value)."""
    counts = list(layers_per_rank)
    for rank, count in enumerate(counts):
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise UsageError(f"layers_per_rank[{rank}] ({count!r}) must be a positive int")
    if sum(counts) != n_layers:
        raise UsageError(f"layers_per_rank {counts} sums to {sum(counts)}, but the model has"
                         f" {n_layers} blocks")
    ranges, start = [], 0
    for count in counts:
        ranges.append((start, start + count))
        start += count
    return ShardPlan(n_layers=n_layers, ranges=tuple(ranges))


def balanced_plan(world_size: int, block_params: Sequence[int], *, head_params: int = 0,
                  tail_params: int = 0,
                  layers_per_rank: Sequence[int] | None = None) -> ShardPlan:
    """Contiguous ranges that balance parameters per rank.

    ``block_params[i]`` is block ``i``'s parameter count; ``head_params`` (embeddings, on rank
    0) and ``tail_params`` (final norm and unembedding, on the last rank) weigh on their ranks.
    The split minimises the largest rank's total (an exact search over cut points).
    """
    n_layers = len(block_params)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size ({world_size!r}) must be a positive int")
    if world_size > n_layers:
        raise UsageError(f"world_size ({world_size}) must not exceed the number of layers"
                         f" ({n_layers})")
    if layers_per_rank is not None:
        if len(layers_per_rank) != world_size:
            raise UsageError(f"layers_per_rank {list(layers_per_rank)} has {len(layers_per_rank)}"
                             f" entries; world_size is {world_size}")
        return plan_from_counts(n_layers, layers_per_rank)
    weights = [int(p) for p in block_params]
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(rank: int, start: int, stop: int) -> int:
        extra = (head_params if rank == 0 else 0) + (tail_params if rank == world_size - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    # best[r][i]: smallest possible maximum load when ranks 0..r-1 own blocks [0, i)
    inf = float("inf")
    best = [[inf] * (n_layers + 1) for _ in range(world_size + 1)]
    cut = [[0] * (n_layers + 1) for _ in range(world_size + 1)]
    best[0][0] = 0
    for r in range(1, world_size + 1):
        for i in range(r, n_layers - (world_size - r) + 1):
            for j in range(r - 1, i):
                value = max(best[r - 1][j], cost(r - 1, j, i))
                if value < best[r][i]:
                    best[r][i], cut[r][i] = value, j
    ranges, stop = [], n_layers
    for r in range(world_size, 0, -1):
        start = cut[r][stop]
        ranges.append((start, stop))
        stop = start
    return ShardPlan(n_layers=n_layers, ranges=tuple(reversed(ranges)))
