"""The one on-disk format of a save context: a safetensors file with a JSON header.

Tensors (saved entries, reducer state, tensor values of ``ctx.state``) are stored as safetensors
tensors named ``entry/{key}/{i}``, ``reducer/{name}/{field}`` and ``state/{key}``; everything else
(counts, reducer configuration, JSON values of ``ctx.state``) is the ``cloche`` metadata entry.
``handle.persist(path)`` writes one; the server's ``--state-dir`` journal (``probes.journal``)
writes one per commit; ``handle.restore(path)`` and a restarting server read them back.
Writes are atomic: a file is written under a temporary name, flushed to disk, then renamed.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from cloche.errors import UsageError
from cloche.probes.reducers import reducer_from_state
from cloche.probes.store import SaveContext

__all__ = ["atomic_write", "read_context", "read_extra", "write_context"]


def atomic_write(path: str | os.PathLike[str], write: Any) -> None:
    """``write(tmp_path)``, then fsync and rename to ``path``: readers see all of it or none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # the rename itself survives a crash
    finally:
        os.close(directory)


def write_context(ctx: SaveContext, path: str | os.PathLike[str], *,
                  extra: dict[str, Any] | None = None) -> None:
    """Write a whole context (entries, reducers, tensor and JSON state) to one safetensors file.

    ``extra`` is stored with it (JSON) and read back by :func:`read_extra`.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"num_runs": ctx.num_runs, "num_examples": ctx.num_examples,
                            "entries": {}, "reducers": {}, "state": {}, "state_tensors": [],
                            "order": {k: [list(o) for o in v] for k, v in ctx.order.items()},
                            "extra": extra or {}}
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
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"cloche": header}))


def read_context(path: str | os.PathLike[str], name: str) -> SaveContext:
    """A context named ``name`` from a file :func:`write_context` wrote."""
    meta = _meta(path)
    tensors = load_file(os.fspath(path))
    ctx = SaveContext(name)
    ctx.num_runs = meta["num_runs"]
    ctx.num_examples = meta.get("num_examples", 0)
    ctx.order = {k: [tuple(o) for o in v] for k, v in meta.get("order", {}).items()}
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


def read_extra(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``extra`` metadata :func:`write_context` stored in ``path``."""
    return dict(_meta(path).get("extra") or {})


def _meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            header = (f.metadata() or {}).get("cloche")
    except (OSError, SafetensorError) as exc:
        raise UsageError(f"cannot read a saved context from {os.fspath(path)!r}: {exc}") from exc
    if header is None:
        raise UsageError(f"{os.fspath(path)!r} was not written by persist()")
    meta: dict[str, Any] = json.loads(header)
    return meta
