"""What can be done to a save context held in this process: the handle's actions, executed.

:func:`context_action` carries out one action (``keys``, ``fetch``, ``state``, ``num_runs``,
``reducers``, ``result``, ``nbytes``, ``clear``, ``persist``, ``restore``) on a
:class:`~cloche.probes.store.SaveStore`. The local executor calls it for the user's handle, and
every rank of a sharded model for its own part; :func:`write_context` / :func:`read_context`
are the one on-disk format (safetensors with a JSON header) for persisted contexts.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cloche.errors import UsageError
from cloche.probes.reducers import Reducer, reducer_from_state
from cloche.probes.refs import Op, apply_ops
from cloche.probes.store import SaveContext, SaveStore

__all__ = ["FETCH_MODES", "combine", "context_action", "entries", "join_entries", "read_context",
           "write_context"]

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


def entries(store: SaveStore, name: str, key: str) -> list[torch.Tensor]:
    """The committed entries under ``key`` (a copy of the list, not of the tensors)."""
    with store.lock:
        ctx = store.find(name)
        values = None if ctx is None else ctx.entries.get(key)
        if values is None:
            keys = [] if ctx is None else sorted(ctx.entries)
            raise UsageError(f"save context {name!r} has no key {key!r} (keys: {keys})")
        return list(values)


def _copy_reducers(ctx: SaveContext | None) -> dict[str, Reducer]:
    if ctx is None:
        return {}
    return {n: r.empty_like().merge(r) for n, r in ctx.reducers.items()}


def context_action(store: SaveStore, name: str, action: str, args: tuple[Any, ...] = ()) -> Any:
    """Carry out one handle action on the context ``name`` of ``store``."""
    if action == "fetch":  # joined outside the lock: a big stack must not hold up commits
        key, mode, ops = _args(action, args, 3)
        return join_entries(entries(store, name, key), mode, key, ops)
    with store.lock:
        ctx = store.find(name)
        if action == "keys":
            return [] if ctx is None else sorted(ctx.entries)
        if action == "state":
            return {} if ctx is None else copy.deepcopy(ctx.state)
        if action == "num_runs":
            return 0 if ctx is None else ctx.num_runs
        if action == "reducers":
            return _copy_reducers(ctx)
        if action == "result":
            (rname,) = _args(action, args, 1)
            reducer = None if ctx is None else ctx.reducers.get(rname)
            if reducer is None:
                raise UsageError(f"save context {name!r} has no reducer {rname!r}")
            return reducer.result()
        if action == "nbytes":
            return 0 if ctx is None else ctx.nbytes()
        if action == "clear":
            store.drop(name)
            return None
        if action == "persist":
            (path,) = _args(action, args, 1)
            write_context(ctx if ctx is not None else SaveContext(name), path)
            return None
        if action == "restore":
            (path,) = _args(action, args, 1)
            store.put(read_context(path, name))
            return None
    raise UsageError(f"unknown save-context action {action!r}")


def _args(action: str, args: tuple[Any, ...], n: int) -> tuple[Any, ...]:
    if not isinstance(args, (tuple, list)) or len(args) != n:
        raise UsageError(f"save-context action {action!r} takes {n} argument(s), got {args!r}")
    return tuple(args)


def write_context(ctx: SaveContext, path: str | os.PathLike[str]) -> None:
    """Write a whole context (entries, reducers, tensor and JSON state) to one safetensors file."""
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
        raise UsageError(f"ctx.state of {ctx.name!r} holds values that are neither tensors nor"
                         f" JSON: {exc}") from exc
    save_file(tensors, os.fspath(path), metadata={"cloche": header})


def read_context(path: str | os.PathLike[str], name: str) -> SaveContext:
    """A context named ``name`` from a file :func:`write_context` wrote."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = (f.metadata() or {}).get("cloche")
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"cannot read a saved context from {os.fspath(path)!r}: {exc}") from exc
    if header is None:
        raise UsageError(f"{os.fspath(path)!r} was not written by persist()")
    meta = json.loads(header)
    tensors = load_file(os.fspath(path))
    ctx = SaveContext(name)
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
    return ctx

