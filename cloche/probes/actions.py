"""What can be done to a save context held in this process: the handle's actions, executed.

:func:`context_action` carries out one action (``keys``, ``fetch``, ``fetch_many``, ``state``,
``num_runs``, ``reducers``, ``result``, ``nbytes``, ``clear``, ``persist``, ``restore``) on a
:class:`~cloche.probes.store.SaveStore`. The local executor calls it for the user's handle, and
every rank of a sharded model for its own part; :func:`write_context` / :func:`read_context`
(``probes.disk``) are the one on-disk format for persisted contexts.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.probes.disk import read_context, write_context
from cloche.probes.reducers import Reducer
from cloche.probes.refs import Op, apply_ops
from cloche.probes.store import SaveContext, SaveStore

__all__ = ["FETCH_MODES", "combine", "context_action", "entries", "entries_of", "join_entries"]

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
    return entries_of(store, name, [key])[key]


def entries_of(store: SaveStore, name: str, keys: list[str] | None
               ) -> dict[str, list[torch.Tensor]]:
    """The committed entries of several keys (``None``: every key), read under one lock hold."""
    with store.lock:
        ctx = store.find(name)
        held = {} if ctx is None else ctx.entries
        wanted = sorted(held) if keys is None else list(dict.fromkeys(keys))
        missing = [key for key in wanted if key not in held]
        if missing:
            named = repr(missing[0]) if len(missing) == 1 else str(missing)
            raise UsageError(f"save context {name!r} has no key {named} (keys: {sorted(held)})")
        return {key: list(held[key]) for key in wanted}


def _copy_reducers(ctx: SaveContext | None) -> dict[str, Reducer]:
    if ctx is None:
        return {}
    return {n: r.empty_like().merge(r) for n, r in ctx.reducers.items()}


def context_action(store: SaveStore, name: str, action: str, args: tuple[Any, ...] = ()) -> Any:
    """Carry out one handle action on the context ``name`` of ``store``."""
    if action == "fetch":  # joined outside the lock: a big stack must not hold up commits
        key, mode, ops = _args(action, args, 3)
        return join_entries(entries(store, name, key), mode, key, ops)
    if action == "fetch_many":
        keys, mode = _args(action, args, 2)
        held = entries_of(store, name, keys)
        return {key: join_entries(values, mode, key, None) for key, values in held.items()}
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
            return 0 if ctx is None else ctx.nbytes
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
