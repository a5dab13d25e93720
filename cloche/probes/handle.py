"""A local handle on one save context: list, fetch, slice, persist, clear."""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from cloche.errors import UsageError
from cloche.probes.reducers import Reducer, reducer_from_state
from cloche.probes.refs import Op, TensorRef, apply_ops
from cloche.probes.store import SaveContext, SaveStore

FETCH_MODES = ("stack", "cat", "list")


def combine(values: list[torch.Tensor], mode: str, key: str) -> torch.Tensor | list[torch.Tensor]:
    """Join the entries of one key: stacked along a new run axis, concatenated, or a list.

    A single entry comes back as a view of the stored tensor (no copy); treat fetched tensors
    as read-only, or ``clone()`` them before writing in place.
    """
    if mode not in FETCH_MODES:
        raise UsageError(f"fetch mode must be one of {FETCH_MODES}, not {mode!r}")
    if mode == "list":
        return list(values)
    if not values:
        raise UsageError(f"key {key!r} holds no entries")
    if len(values) == 1:  # a view, not a copy: the common single-run fetch costs nothing
        return values[0].unsqueeze(0) if mode == "stack" else values[0]
    try:
        return torch.stack(values) if mode == "stack" else torch.cat(values)
    except RuntimeError as exc:
        shapes = sorted({tuple(v.shape) for v in values})
        raise UsageError(
            f"cannot {mode} the {len(values)} entries of {key!r} (shapes {shapes[:4]}):"
            " fetch with mode='list' or mode='cat'"
        ) from exc


def join_entries(values: list[torch.Tensor], mode: str, key: str, ops: list[Op] | None) -> Any:
    """:func:`combine` the entries of ``key``, then apply the recorded slicing/casting ``ops``."""
    joined = combine(values, mode, key)
    if ops:
        if isinstance(joined, list):
            raise UsageError("slicing applies to stacked or concatenated entries, not lists")
        joined = apply_ops(joined, ops)
    return joined


class SaveContextHandle:
    """The user's view of a save context held by a local model."""

    def __init__(self, store: SaveStore, name: str, *, display_name: str | None = None) -> None:
        self._store = store
        self._name = name
        self.name = display_name or name

    def _ctx(self) -> SaveContext:
        return self._store.get(self._name)

    def keys(self) -> list[str]:
        return sorted(self._ctx().entries)

    def __contains__(self, key: str) -> bool:
        return key in self._ctx().entries

    def _values(self, key: str) -> list[torch.Tensor]:
        with self._store.lock:
            values = self._ctx().entries.get(key)
            if values is None:
                raise UsageError(f"save context {self.name!r} has no key {key!r} (keys: {self.keys()})")
            return list(values)

    def fetch(self, key: str, mode: str = "stack", ops: list[Op] | None = None) -> Any:
        """The entries under ``key``: stacked (one row per entry), concatenated, or a list."""
        return join_entries(self._values(key), mode, key, ops)

    def __getitem__(self, key: str) -> TensorRef:
        return TensorRef(lambda ops: self.fetch(key, "stack", ops), description=f"{self.name}[{key!r}]")

    @property
    def state(self) -> dict[str, Any]:
        with self._store.lock:
            return copy.deepcopy(self._ctx().state)

    @property
    def num_runs(self) -> int:
        return self._ctx().num_runs

    def reducers(self) -> dict[str, Reducer]:
        with self._store.lock:
            return {n: r.empty_like().merge(r) for n, r in self._ctx().reducers.items()}

    def result(self, name: str) -> dict[str, torch.Tensor]:
        with self._store.lock:
            reducer = self._ctx().reducers.get(name)
            if reducer is None:
                raise UsageError(f"save context {self.name!r} has no reducer {name!r}")
            return reducer.result()

    def nbytes(self) -> int:
        return self._ctx().nbytes()

    def clear(self) -> None:
        self._store.drop(self._name)

    def persist(self, path: str | os.PathLike[str]) -> None:
        """Write the whole context (entries, reducers, tensor and JSON state) to safetensors."""
        with self._store.lock:
            ctx = self._ctx()
            tensors: dict[str, torch.Tensor] = {}
            meta: dict[str, Any] = {"num_runs": ctx.num_runs, "entries": {}, "reducers": {},
                                    "state": {}, "state_tensors": []}
            for key, values in ctx.entries.items():
                meta["entries"][key] = len(values)
                for i, v in enumerate(values):
                    tensors[f"entry/{key}/{i}"] = v.detach().cpu().contiguous().clone()
            for rname, reducer in ctx.reducers.items():
                plain = {}
                for field, value in reducer.state_dict().items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"reducer/{rname}/{field}"] = value.detach().cpu().contiguous().clone()
                    else:
                        plain[field] = value
                meta["reducers"][rname] = plain
            for key, value in ctx.state.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"state/{key}"] = value.detach().cpu().contiguous().clone()
                    meta["state_tensors"].append(key)
                else:
                    meta["state"][key] = value
            try:
                header = json.dumps(meta)
            except TypeError as exc:
                raise UsageError(f"ctx.state of {self.name!r} holds values that are neither"
                                 f" tensors nor JSON: {exc}") from exc
        save_file(tensors, os.fspath(path), metadata={"cloche": header})

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Replace this context's contents with what :meth:`persist` wrote."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt") as f:
            header = (f.metadata() or {}).get("cloche")
        if header is None:
            raise UsageError(f"{os.fspath(path)!r} was not written by SaveContextHandle.persist")
        meta = json.loads(header)
        tensors = load_file(os.fspath(path))
        ctx = SaveContext(self._name)
        ctx.num_runs = meta["num_runs"]
        for key, n in meta["entries"].items():
            ctx.entries[key] = [tensors[f"entry/{key}/{i}"] for i in range(n)]
        for rname, plain in meta["reducers"].items():
            prefix = f"reducer/{rname}/"
            state = dict(plain)
            state.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            ctx.reducers[rname] = reducer_from_state(state)
        ctx.state = dict(meta["state"])
        for key in meta["state_tensors"]:
            ctx.state[key] = tensors[f"state/{key}"]
        self._store.put(ctx)

    def __repr__(self) -> str:
        return f"SaveContextHandle({self.name!r}, keys={self.keys()}, runs={self.num_runs})"
