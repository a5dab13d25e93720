"""A save context spread over ranks: gathered only when fetched, reduced with ``merge``.

Probes write on the rank that owns their point, so one save context has a part on each rank.
Nothing moves until asked: ``keys`` and ``num_runs`` are summaries; ``fetch`` of a key held by
one rank slices and casts it there and ships only the result; a key written on several ranks is
gathered and put back in the order a single process would have produced. Reducers of the same
name are merged across ranks with the same ``merge`` that merges batches.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from cloche.errors import UsageError
from cloche.probes.handle import SaveContextHandle, join_entries
from cloche.probes.reducers import Reducer, reducer_from_state
from cloche.probes.refs import Op, TensorRef
from cloche.probes.store import SaveContext, SaveStore

if TYPE_CHECKING:
    from cloche.sharding.model import DistributedModel

__all__ = ["DistSaveContextHandle"]


class DistSaveContextHandle:
    """The same interface as :class:`cloche.SaveContextHandle`, for a sharded model."""

    def __init__(self, model: DistributedModel, name: str) -> None:
        self._model = model
        self._name = name
        self.name = name

    def _summaries(self) -> list[dict[str, Any] | None]:
        return self._model._ctx(self._name, "summary")

    def keys(self) -> list[str]:
        found: set[str] = set()
        for summary in self._summaries():
            if summary:
                found.update(summary["keys"])
        return sorted(found)

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def _holders(self, key: str) -> list[int]:
        holders = [r for r, s in enumerate(self._summaries()) if s and key in s["keys"]]
        if not holders:
            raise UsageError(f"save context {self.name!r} has no key {key!r}"
                             f" (keys: {self.keys()})")
        return holders

    def fetch(self, key: str, mode: str = "stack", ops: list[Op] | None = None) -> Any:
        """The entries under ``key`` — computed where they live when one rank holds them all."""
        holders = self._holders(key)
        if len(holders) == 1:
            (rank,) = holders
            return self._model._ctx(self._name, "fetch", key, mode, ops, ranks=[rank])[rank]
        parts = self._model._ctx(self._name, "entries", key, ranks=holders)
        ordered = sorted((tuple(o), v) for part in parts if part
                         for o, v in zip(part["order"], part["values"]))
        return join_entries([v for _, v in ordered], mode, key, ops)

    def __getitem__(self, key: str) -> TensorRef:
        return TensorRef(lambda ops: self.fetch(key, "stack", ops),
                         description=f"{self.name}[{key!r}]")

    @property
    def state(self) -> dict[str, Any]:
        """``ctx.state`` is per rank; this is their union (a later rank wins a shared key)."""
        merged: dict[str, Any] = {}
        for part in self._model._ctx(self._name, "state"):
            merged.update(part or {})
        return merged

    @property
    def num_runs(self) -> int:
        return max((s["num_runs"] for s in self._summaries() if s), default=0)

    def reducers(self) -> dict[str, Reducer]:
        merged: dict[str, Reducer] = {}
        for part in self._model._ctx(self._name, "reducers"):
            for name, state in (part or {}).items():
                reducer = reducer_from_state(state)
                if name in merged:
                    merged[name].merge(reducer)
                else:
                    merged[name] = reducer
        return merged

    def result(self, name: str) -> dict[str, torch.Tensor]:
        reducers = self.reducers()
        if name not in reducers:
            raise UsageError(f"save context {self.name!r} has no reducer {name!r}")
        return reducers[name].result()

    def nbytes(self) -> int:
        return sum(s["nbytes"] for s in self._summaries() if s)

    def clear(self) -> None:
        self._model._ctx(self._name, "clear")

    def _gathered(self) -> SaveContext:
        ctx = SaveContext(self._name)
        ctx.num_runs = self.num_runs
        for key in self.keys():
            ctx.entries[key] = self.fetch(key, "list")
        ctx.state = copy.deepcopy(self.state)
        ctx.reducers = self.reducers()
        return ctx

    def persist(self, path: Any) -> None:
        """Write the whole context (gathered from every rank) to one safetensors file."""
        store = SaveStore()
        store.put(self._gathered())
        SaveContextHandle(store, self._name).persist(path)

    def restore(self, path: Any) -> None:
        """Replace the context with a file's contents (they then live on rank 0)."""
        store = SaveStore()
        SaveContextHandle(store, self._name).restore(path)
        self.clear()
        self._model._ctx(self._name, "put", store.get(self._name), ranks=[0])

    def __repr__(self) -> str:
        return f"DistSaveContextHandle({self.name!r}, keys={self.keys()}, runs={self.num_runs})"
