"""Mergeable statistics that probes feed with activations: the public face of the reducers.

Usage from a probe (the save context decides where the reducer lives)::

    r = Variance()
    r.update(x, mask=attention_mask)          # x: (..., d); every leading dim is samples
    total = r_rank0.merge(r_rank1)            # same code for batches, runs and ranks
    total.result()                            # {"count", "mean", "var", "var_sample", "std"}

Every reducer round-trips through ``state_dict()`` / ``reducer_from_state`` (tensors plus
plain values), which is how reducers cross the wire and reach safetensors files.

The implementations live in ``reducers_moments`` (Mean, Variance, Covariance),
``reducers_counts`` (Histogram, MinMax) and ``reducers_topk`` (TopK); ``reducers_base`` holds
the contract they share.
"""

from __future__ import annotations

from typing import Any

from cloche.errors import UsageError
from cloche.probes.reducers_base import REDUCERS, Reducer
from cloche.probes.reducers_counts import Histogram, MinMax
from cloche.probes.reducers_moments import Covariance, Mean, Variance
from cloche.probes.reducers_topk import TopK

__all__ = [
    "REDUCERS",
    "Covariance",
    "Histogram",
    "Mean",
    "MinMax",
    "Reducer",
    "TopK",
    "Variance",
    "reducer_from_state",
]


def reducer_from_state(state: dict[str, Any]) -> Reducer:
    """Rebuild whichever reducer ``state`` (the output of ``state_dict()``) describes."""
    if not isinstance(state, dict):
        raise UsageError(f"reducer state must be a dict, got {type(state).__name__}")
    kind = state.get("kind")
    cls = REDUCERS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise UsageError(f"unknown reducer kind {kind!r}; known kinds: {sorted(REDUCERS)}")
    return cls.from_state_dict(state)
