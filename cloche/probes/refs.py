"""Lazy references to saved tensors: slice and cast where the data lives, transfer only the result.

``handle["acts"][:, -1, 42].to(torch.float16)`` records an index and a cast; nothing is computed
or copied until ``fetch()``. The recorded operations are plain data (msgpack-serialisable), so a
remote client ships them to the server, which applies them with :func:`apply_ops` next to the
saved tensors. A local handle uses the same class, so notebook code runs unchanged on both.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError

Op = list[Any]


def _encode_item(item: Any) -> Any:
    if item is None or isinstance(item, bool):
        return {"n": None} if item is None else {"b": item}
    if isinstance(item, int):
        return item
    if item is Ellipsis:
        return {"e": 1}
    if isinstance(item, slice):
        return {"s": [_plain_int(item.start), _plain_int(item.stop), _plain_int(item.step)]}
    if isinstance(item, torch.Tensor):
        item = item.tolist() if item.dim() else item.item()
        return _encode_item(item)
    if isinstance(item, (list, tuple)) and all(isinstance(i, (int, bool)) for i in item):
        return {"l": [int(i) if not isinstance(i, bool) else i for i in item]}
    raise UsageError(f"cannot index a saved tensor with {item!r} (use ints, slices, None, ...,"
                     " int lists)")


def _plain_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _decode_item(item: Any) -> Any:
    if isinstance(item, int):
        return item
    if not isinstance(item, dict) or len(item) != 1:
        raise UsageError(f"malformed index item {item!r}")
    (tag, value), = item.items()
    if tag == "n":
        return None
    if tag == "b":
        return bool(value)
    if tag == "e":
        return Ellipsis
    if tag == "s":
        return slice(*value)
    if tag == "l":
        return torch.tensor(value)
    raise UsageError(f"malformed index item {item!r}")


def encode_index(index: Any) -> Op:
    items = index if isinstance(index, tuple) else (index,)
    return ["index", [_encode_item(i) for i in items]]


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    name = str(dtype).removeprefix("torch.")
    if not isinstance(getattr(torch, name, None), torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r}")
    return name


def apply_ops(tensor: torch.Tensor, ops: list[Op]) -> torch.Tensor:
    """Apply recorded operations to ``tensor`` (on the side that holds it)."""
    for op in ops:
        kind = op[0]
        shape = tuple(tensor.shape)
        try:
            if kind == "index":
                tensor = tensor[tuple(_decode_item(i) for i in op[1])]
            elif kind == "to":
                tensor = tensor.to(getattr(torch, _dtype_name(op[1])))
            else:
                raise UsageError(f"unknown tensor operation {kind!r}")
        except (IndexError, TypeError, ValueError, RuntimeError) as exc:
            # the ops come from the user (or a peer): indexing that does not fit is their error
            raise UsageError(f"cannot apply {op!r} to a saved tensor of shape {shape}: {exc}"
                             ) from exc
    return tensor


class TensorRef:
    """A saved tensor, possibly sliced and cast, not yet transferred.

    ``fetch`` is a callable that takes the op list and returns the materialised tensor; a local
    handle applies the ops to the stored tensor, a remote one sends them to the server.
    """

    __slots__ = ("_fetch", "description", "ops")

    def __init__(self, fetch: Callable[[list[Op]], torch.Tensor], ops: list[Op] | None = None,
                 description: str = "") -> None:
        self._fetch = fetch
        self.ops: list[Op] = list(ops or [])
        self.description = description

    def __getitem__(self, index: Any) -> TensorRef:
        return TensorRef(self._fetch, [*self.ops, encode_index(index)], self.description)

    def to(self, dtype: Any) -> TensorRef:
        return TensorRef(self._fetch, [*self.ops, ["to", _dtype_name(dtype)]], self.description)

    def float(self) -> TensorRef:
        return self.to(torch.float32)

    def fetch(self) -> torch.Tensor:
        """Materialise: apply the recorded operations where the data is and return the result."""
        return self._fetch(self.ops)

    def numpy(self) -> np.ndarray:
        return self.fetch().numpy()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.fetch().numpy()
        return array.astype(dtype) if dtype is not None else array

    def __repr__(self) -> str:
        return f"TensorRef({self.description!r}, ops={self.ops})"
