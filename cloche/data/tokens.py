"""Where a dataset's token ids live: a small array in memory, or a file read piece by piece.

A :class:`TokenFile` is a flat array of token ids on disk — a ``.npy`` file, a raw ``.bin``
(``uint16``/``uint32``, what nanoGPT-style pipelines write), or a file of the tokenization cache
(``cloche.data.cache``). It is read with ``os.pread`` one batch at a time: nothing is mapped and
nothing is kept, so a run over a billion tokens holds a batch, not the dataset, and pickles as
its path (a sharded model's ranks and a server reopen the same file).
"""

from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloche.errors import Cancelled, UsageError

__all__ = ["TOKEN_DTYPES", "ArrayTokens", "TokenFile", "open_npy", "open_raw"]

#: the dtypes a token file may hold
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
_HASH_CHUNK = 1 << 24


@dataclass(frozen=True)
class ArrayTokens:
    """Token ids held in memory (small datasets: texts given by the user)."""

    array: np.ndarray

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])

    def content_hash(self, cancel: Any = None) -> str:
        return hashlib.sha256(self.array.astype("<i8").tobytes()).hexdigest()


@dataclass(frozen=True)
class TokenFile:
    """``count`` token ids of ``dtype`` in ``path``, starting ``offset`` bytes in.

    ``content`` is the hash of the ids when it is already known (a cache file is named by it).
    """

    path: str
    dtype: str
    count: int
    offset: int = 0
    content: str | None = None
    _fd: dict[int, int] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "dtype": self.dtype, "count": self.count,
                "offset": self.offset, "content": self.content}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        object.__setattr__(self, "_fd", {})
        object.__setattr__(self, "_lock", threading.Lock())

    def _descriptor(self) -> int:
        pid = os.getpid()  # a descriptor is not shared with a forked child
        with self._lock:
            fd = self._fd.get(pid)
            if fd is None:
                try:
                    fd = os.open(self.path, os.O_RDONLY)
                except OSError as exc:
                    raise UsageError(f"cannot open the token file {self.path!r} (token files are"
                                     f" read where the model runs): {exc}") from exc
                self._fd[pid] = fd
            return fd

    def read(self, start: int, stop: int) -> np.ndarray:
        """Ids ``start`` .. ``stop - 1`` (a fresh array; the file is not mapped)."""
        start, stop = max(0, start), min(self.count, stop)
        if stop <= start:
            return np.zeros(0, dtype=self.dtype)
        size = np.dtype(self.dtype).itemsize
        want = (stop - start) * size
        data = os.pread(self._descriptor(), want, self.offset + start * size)
        if len(data) != want:
            raise UsageError(f"the token file {self.path!r} is shorter than it was when opened")
        return np.frombuffer(data, dtype=np.dtype(self.dtype).newbyteorder("<"))

    def content_hash(self, cancel: Any = None) -> str:
        """sha256 of the ids (read in pieces; stops with Cancelled when ``cancel`` is set)."""
        if self.content is not None:
            return self.content
        from cloche.data.stamps import remembered, stamp_of

        stamp = f"{stamp_of([Path(self.path)])}|{self.offset}|{self.dtype}|{self.count}"
        digest = remembered("token-file", stamp, lambda: self._hash(cancel))
        object.__setattr__(self, "content", digest)
        return digest

    def _hash(self, cancel: Any) -> str:
        h = hashlib.sha256(f"{self.dtype}:{self.count}:".encode())
        step = _HASH_CHUNK // np.dtype(self.dtype).itemsize
        for start in range(0, self.count, step):
            if cancel is not None and cancel.is_set():
                raise Cancelled("the dataset run was cancelled (while hashing its token file)")
            h.update(self.read(start, start + step).tobytes())
        return h.hexdigest()


def _check_dtype(dtype: Any, path: Path) -> str:
    name = np.dtype(dtype).name
    if name not in TOKEN_DTYPES:
        raise UsageError(f"token file {str(path)!r} holds {name}; token ids are one of"
                         f" {', '.join(TOKEN_DTYPES)}")
    return name


def open_npy(path: str | os.PathLike[str]) -> tuple[TokenFile, int | None]:
    """A ``.npy`` array of token ids: 1-D (one stream), or 2-D ``(rows, width)`` (one row per
    example; the width is returned). Only the header is read."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read {str(path)!r} as a .npy array of token ids: {exc}"
                         ) from exc
    if fortran and len(shape) > 1:
        raise UsageError(f"{str(path)!r} is stored in Fortran order; save it C-contiguous")
    if np.dtype(dtype).byteorder == ">":
        raise UsageError(f"{str(path)!r} is big-endian; save it little-endian")
    if len(shape) not in (1, 2):
        raise UsageError(f"{str(path)!r} has shape {shape}: token files are 1-D (a stream) or"
                         " 2-D (rows)")
    count = int(np.prod(shape))
    tokens = TokenFile(str(path.resolve()), _check_dtype(dtype, path), count, offset)
    return tokens, (int(shape[1]) if len(shape) == 2 else None)


def open_raw(path: str | os.PathLike[str], dtype: str = "uint16") -> TokenFile:
    """A raw little-endian file of token ids (nanoGPT's ``train.bin`` is ``uint16``)."""
    path = Path(path)
    name = _check_dtype(dtype, path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise UsageError(f"cannot read the token file {str(path)!r}: {exc}") from exc
    itemsize = np.dtype(name).itemsize
    if size % itemsize:
        raise UsageError(f"{str(path)!r} has {size} bytes, not a whole number of {name} ids")
    return TokenFile(str(path.resolve()), name, size // itemsize)
