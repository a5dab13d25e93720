"""The save-contexts page: what this session's save contexts hold, a slice of one key, clear.

Shapes are read next to the data (one ``model.call``), so listing a context moves no tensors;
a slice is a :class:`cloche.TensorRef` index applied where the data lives. The slice text is
parsed here into ints and slices (``0, :, 2:10``) — it is never evaluated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloche.errors import UsageError

__all__ = ["MAX_CELLS", "clear_context", "contexts_page", "parse_slice", "slice_page"]

MAX_CELLS = 20_000


def _describe(m: Any, names: list[str]) -> list[dict[str, Any]]:
    """Runs next to the model: keys, entry counts, shapes and dtypes of every context."""
    out = []
    for name in names:
        handle = m.save_context(name)
        keys, names_of_keys = [], handle.keys()
        for key in names_of_keys:
            entries = handle.fetch(key, "list")
            first = entries[0] if len(entries) else None
            shapes = {tuple(getattr(e, "shape", ())) for e in entries}
            keys.append({"key": key, "entries": len(entries),
                         "shape": list(getattr(first, "shape", ())) if first is not None else [],
                         "same_shape": len(shapes) <= 1,
                         "dtype": str(getattr(first, "dtype", type(first).__name__)),
                         "bytes": int(sum(getattr(e, "nbytes", 0) for e in entries))})
        out.append({"name": name, "runs": handle.num_runs, "nbytes": handle.nbytes,
                    "keys": keys, "reducers": sorted(handle.reducers())})
    return out


def contexts_page(model: Any) -> dict[str, Any]:
    """Every save context of this session with its keys, shapes and sizes."""
    names = sorted(model.save_contexts())
    return {"model": model.name, "contexts": model.call(_describe, names) if names else []}


def parse_slice(text: str) -> tuple[Any, ...]:
    """``"0, :, 2:10"`` -> ``(0, slice(None), slice(2, 10))``; ints and slices only."""
    if not text.strip():
        return ()
    parts: list[Any] = []
    for raw in text.split(","):
        part = raw.strip()
        try:
            if ":" in part:
                bits = [int(b) if b.strip() else None for b in part.split(":")]
                if len(bits) > 3:
                    raise ValueError
                parts.append(slice(*bits))
            else:
                parts.append(int(part))
        except ValueError:
            raise UsageError(f"a slice is ints and start:stop[:step] parts separated by commas,"
                             f" not {text!r}") from None
    return tuple(parts)


def slice_page(model: Any, name: str, key: str, index: str) -> dict[str, Any]:
    """``handle[key][index]`` (entries stacked on a first axis), as at most 2-d numbers."""
    handle = model.save_context(name)
    if key not in handle:
        raise UsageError(f"save context {name!r} has no key {key!r}")
    value = handle[key][parse_slice(index)].fetch() if index.strip() else handle.fetch(key)
    array = np.asarray(value.detach().double().cpu() if hasattr(value, "detach") else value,
                       dtype=np.float64)
    array = array.reshape(()) if array.size == 1 and array.ndim > 2 else array
    if array.ndim > 2:
        raise UsageError(f"the slice has shape {list(array.shape)}: index it down to one or two"
                         " dimensions (e.g. 0, 0)")
    if array.size > MAX_CELLS:
        raise UsageError(f"the slice has {array.size} numbers; show at most {MAX_CELLS}")
    table = array.reshape(1, -1) if array.ndim < 2 else array
    return {"name": name, "key": key, "index": index, "shape": list(array.shape),
            "values": table.tolist()}


def clear_context(model: Any, name: str) -> dict[str, Any]:
    if name not in model.save_contexts():
        raise UsageError(f"no save context named {name!r}")
    model.save_context(name).clear()
    return {"cleared": name}
