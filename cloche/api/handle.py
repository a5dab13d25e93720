"""The user's handle on one save context, whatever executes the model.

Every method is one :class:`~cloche.api.requests.Context` request, so a handle works the same on
a local model, a sharded one (the executor gathers the parts from every rank) and a remote one
(the server does the work; only results cross the network). ``handle["acts"]`` is a lazy
:class:`~cloche.probes.refs.TensorRef`: indexing and ``.to(dtype)`` are recorded and applied
where the data lives, so only the final slice moves.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from cloche.api.requests import Context
from cloche.probes.reducers import Reducer
from cloche.probes.refs import Op, TensorRef

if TYPE_CHECKING:
    from cloche.api.executor import Executor

__all__ = ["SaveContextHandle", "SaveContexts"]

#: how ``fetch``'s default mode shapes what it returns, said wherever a context shows itself
FETCH_AXIS = "fetch(key) stacks the entries on a new first axis: (entries, *entry shape)"


class SaveContextHandle:
    """A named save context: list, fetch, slice, reduce, persist, clear."""

    def __init__(self, executor: Executor, name: str) -> None:
        self._executor = executor
        self.name = name

    def _do(self, action: str, *args: Any) -> Any:
        return self._executor.execute(Context(name=self.name, action=action, args=args))

    def keys(self) -> list[str]:
        return self._do("keys")

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def fetch(self, key: str, mode: str = "stack", ops: list[Op] | None = None) -> Any:
        """The entries under ``key``: stacked (one row per entry), concatenated, or a list.

        ``ops`` (recorded by ``handle[key][...]``) are applied where the entries live. A single
        entry of a local model comes back as a view: ``clone()`` it before writing in place.
        """
        return self._do("fetch", key, mode, ops)

    def fetch_all(self, keys: Iterable[str] | None = None, mode: str = "stack"
                  ) -> dict[str, Any]:
        """Every key's entries (or those of ``keys``), as :meth:`fetch` joins them, in one request.

        One round trip instead of one per key: through a server, or from a sharded model
        (one read per rank that holds keys), that is what reading a whole capture costs.
        """
        wanted = None if keys is None else [keys] if isinstance(keys, str) else list(keys)
        return self._do("fetch_many", wanted, mode)

    def __getitem__(self, key: str) -> TensorRef:
        return TensorRef(lambda ops: self.fetch(key, "stack", ops),
                         description=f"{self.name}[{key!r}]")

    @property
    def state(self) -> dict[str, Any]:
        """A copy of ``ctx.state`` (on a sharded model: the union over ranks)."""
        return self._do("state")

    @property
    def num_runs(self) -> int:
        """Runs committed to the context (``fetch``'s default ``stack`` has one row per run)."""
        return self._do("num_runs")

    def reducers(self) -> dict[str, Reducer]:
        """Copies of the context's reducers (merged across ranks)."""
        return self._do("reducers")

    def result(self, name: str) -> dict[str, torch.Tensor]:
        """The reduced statistic ``name`` (e.g. ``{"mean": ..., "count": ...}``)."""
        return self._do("result", name)

    @property
    def nbytes(self) -> int:
        """Bytes the context holds (saved entries and reducer states), where the model runs."""
        return self._do("nbytes")

    def clear(self) -> None:
        self._do("clear")

    def persist(self, path: str | os.PathLike[str]) -> None:
        """Write the whole context to a safetensors file at ``path`` where the model runs."""
        self._do("persist", os.fspath(path))

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Replace the context with what :meth:`persist` wrote to ``path`` where the model runs."""
        self._do("restore", os.fspath(path))

    def __repr__(self) -> str:
        """Name, runs and keys; and the axis ``fetch`` adds (one row per entry, i.e. per run)."""
        try:
            runs, keys = self.num_runs, self.keys()
        except Exception:  # noqa: BLE001 - a repr never raises (a closed connection, say)
            return f"SaveContextHandle({self.name!r})"
        shown = ", ".join(repr(k) for k in keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"SaveContextHandle({self.name!r}: {runs} run(s), keys [{shown}]; {FETCH_AXIS})"

    def _repr_html_(self) -> str:
        """In a notebook: the context's runs and size, and its keys with how to read each."""
        from cloche.api.html import human_bytes, table

        runs, keys, size = self.num_runs, self.keys(), self.nbytes
        rows = [(key, f"handle[{key!r}][...].fetch()", f"fetch({key!r}, mode='list')")
                for key in keys]
        return table(["key", "a slice, cut where it lives", "a list, one per entry"], rows,
                     caption=f"save context {self.name!r}: {runs} run(s), {len(keys)} key(s),"
                             f" {human_bytes(size)}", note=FETCH_AXIS)


class SaveContexts(list[str]):
    """``model.save_contexts()``: the names (a plain list of str), and in a notebook a table of
    each context's runs, keys and size."""

    def __init__(self, names: list[str], executor: Executor) -> None:
        super().__init__(names)
        self._executor = executor

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled (returned from ``model.call``, say) as the plain list of names."""
        return (list, (list(self),))

    def _repr_html_(self) -> str:
        from cloche.api.html import human_bytes, table

        rows = []
        for name in self:
            handle = SaveContextHandle(self._executor, name)
            keys = handle.keys()
            shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
            rows.append((name, handle.num_runs, shown, human_bytes(handle.nbytes)))
        return table(["save context", "runs", "keys", "size"], rows,
                     caption=f"{len(self)} save context(s)",
                     note=f"model.save_context(name) is a handle; {FETCH_AXIS}")
