"""Save-context handles of a remote model: everything happens on the server until ``fetch``.

``handle["acts"]`` is a lazy :class:`~cloche.probes.refs.TensorRef`: indexing and ``.to(dtype)``
are recorded, shipped with the fetch request and applied on the server, so only the final slice
crosses the network. Same methods as the local handle.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from cloche.probes.refs import Op, TensorRef

if TYPE_CHECKING:
    from cloche.client.remote import RemoteModel

__all__ = ["RemoteSaveContext"]


class RemoteSaveContext:
    def __init__(self, model: RemoteModel, name: str) -> None:
        self._model = model
        self.name = name

    def _call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        return self._model._call(f"ctx.{op}", self.name, *args, **kwargs)

    def keys(self) -> list[str]:
        return self._call("keys")

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def fetch(self, key: str, mode: str = "stack", ops: list[Op] | None = None) -> Any:
        """The entries under ``key`` (stacked, concatenated or a list), ops applied remotely."""
        return self._call("fetch", key, mode, ops)

    def __getitem__(self, key: str) -> TensorRef:
        return TensorRef(lambda ops: self.fetch(key, "stack", ops),
                         description=f"{self.name}[{key!r}]")

    @property
    def state(self) -> dict[str, Any]:
        return self._call("state")

    @property
    def num_runs(self) -> int:
        return self._call("num_runs")

    def reducers(self) -> dict[str, Any]:
        return self._call("reducers")

    def result(self, name: str) -> dict[str, Any]:
        return self._call("result", name)

    def nbytes(self) -> int:
        return self._call("nbytes")

    def clear(self) -> None:
        self._call("clear")

    def persist(self, path: str | os.PathLike[str]) -> None:
        """Write the context to ``path`` *on the server*."""
        self._call("persist", os.fspath(path))

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Replace the context with what ``persist`` wrote to ``path`` *on the server*."""
        self._call("restore", os.fspath(path))

    def __repr__(self) -> str:
        return f"RemoteSaveContext({self.name!r} on {self._model.address})"
