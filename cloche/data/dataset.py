"""The :class:`Dataset` container and its :class:`Batch` (no tokenizers here).

A dataset's token ids live in a token source (``cloche.data.tokens``): in memory for a few
texts, in a file read one batch at a time for anything large. Examples are cut from the ids in
one of two ways, both fixed by the dataset's content alone, so ids are stable across runs and
machines: *variable* examples with explicit offsets (one per text, or one per row of a
pre-tokenized dataset, cut to ``seq_len``), or *strided* examples — example ``i`` starts at
``i * stride`` and has ``min(stride, seq_len)`` ids (a stream cut into ``seq_len`` pieces, or
the rows of a 2-D token array).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.data.tokens import ArrayTokens
from cloche.errors import Cancelled, UsageError

__all__ = ["Batch", "Dataset"]


@dataclass(frozen=True)
class Batch:
    """Consecutive examples, right-padded to the longest one in the batch.

    ``example_ids`` (b,) are the examples' stable ids; ``tokens`` (b, L) the token ids, with the
    dataset's pad id after each example's end; ``attention_mask`` (b, L) is 1 on real tokens.
    """

    example_ids: torch.Tensor
    tokens: torch.Tensor
    attention_mask: torch.Tensor


class Dataset:
    """An ordered, immutable list of tokenized examples; example ``i`` has id ``i``.

    ``Dataset(examples, ...)`` holds a few examples in memory; :meth:`from_tokens` cuts examples
    from a token source (a file is read one batch at a time, never held whole).
    """

    def __init__(
        self,
        examples: Sequence[Sequence[int] | np.ndarray],
        *,
        name: str,
        seq_len: int,
        pad_id: int,
    ) -> None:
        if seq_len < 1:
            raise UsageError(f"seq_len ({seq_len}) must be at least 1")
        lengths = [len(e) for e in examples]
        for i, n in enumerate(lengths):
            if n == 0:
                raise UsageError(f"example {i} of dataset {name!r} has no tokens")
            if n > seq_len:
                raise UsageError(
                    f"example {i} of dataset {name!r} is longer than seq_len ({n} > {seq_len})"
                )
        parts = [np.asarray(e, dtype=np.int64) for e in examples]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
            raise UsageError(f"dataset {name!r} has token ids outside [0, 2**31)")
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        if lengths:
            offsets[1:] = np.cumsum(lengths)
        self._setup(ArrayTokens(flat.astype(np.int32)), name=name, seq_len=seq_len,
                    pad_id=pad_id, offsets=ArrayTokens(offsets), stride=None)
        self._in_memory = True

    @classmethod
    def from_tokens(cls, tokens: Any, *, name: str, seq_len: int, pad_id: int,
                    stride: int | None = None, offsets: Any = None) -> Dataset:
        """Examples cut from ``tokens`` (an ``ArrayTokens`` or ``TokenFile``).

        ``offsets`` (a token source of ``n + 1`` int64 offsets): example ``i`` is
        ``tokens[offsets[i]:offsets[i + 1]]`` cut to ``seq_len``. Otherwise example ``i``
        starts at ``i * stride`` (``stride`` defaults to ``seq_len``) and is cut to
        ``seq_len``; the last may be shorter.
        """
        if seq_len < 1:
            raise UsageError(f"seq_len ({seq_len}) must be at least 1")
        if offsets is None and (stride if stride is not None else seq_len) < 1:
            raise UsageError(f"stride ({stride}) must be at least 1")
        ds = cls.__new__(cls)
        ds._setup(tokens, name=name, seq_len=seq_len, pad_id=pad_id, offsets=offsets,
                  stride=None if offsets is not None else (stride or seq_len))
        ds._in_memory = False
        return ds

    def _setup(self, tokens: Any, *, name: str, seq_len: int, pad_id: int, offsets: Any,
               stride: int | None) -> None:
        self.name = name
        self.seq_len = seq_len
        self.pad_id = pad_id
        self._tokens = tokens
        self._offsets = offsets
        self._stride = stride
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        if self._offsets is not None:
            return len(self._offsets) - 1
        assert self._stride is not None
        return -(-len(self._tokens) // self._stride)

    def _bounds(self, first: int, stop: int) -> list[tuple[int, int]]:
        """(start, end) in the token source of examples ``first`` .. ``stop - 1``."""
        if self._offsets is not None:
            offs = self._offsets.read(first, stop + 1).astype(np.int64)
            return [(int(a), int(min(b, a + self.seq_len))) for a, b in itertools.pairwise(offs)]
        assert self._stride is not None
        n = len(self._tokens)
        return [(i * self._stride, min(n, i * self._stride + min(self._stride, self.seq_len)))
                for i in range(first, stop)]

    def _rows(self, first: int, stop: int) -> list[np.ndarray]:
        bounds = self._bounds(first, stop)
        if not bounds:
            return []
        lo, hi = bounds[0][0], max(b for _, b in bounds)
        flat = self._tokens.read(lo, hi)  # one read for the whole batch
        return [flat[a - lo:b - lo] for a, b in bounds]

    def __getitem__(self, i: int) -> torch.Tensor:
        """The example with id ``i`` as a LongTensor of its (unpadded) token ids."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise UsageError(f"example ids are ints, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise UsageError(
                f"example id {i} is out of range for dataset {self.name!r} ({len(self)} examples)"
            )
        return torch.from_numpy(self._rows(i, i + 1)[0].astype(np.int64))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, examples={len(self)}, seq_len={self.seq_len}, "
            f"tokens={self.num_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        """Token ids in all examples (ids past ``seq_len`` in a longer row are not counted)."""
        if self._offsets is None and self._stride is not None and self._stride <= self.seq_len:
            return len(self._tokens)
        if self._offsets is None:
            return sum(b - a for a, b in self._bounds(0, len(self)))
        if self._in_memory:
            return len(self._tokens)
        total, step = 0, 1 << 20
        for first in range(0, len(self), step):
            total += sum(b - a for a, b in self._bounds(first, min(len(self), first + step)))
        return total

    def batches(
        self, batch_size: int, *, limit: int | None = None, start: int = 0
    ) -> Iterator[Batch]:
        """Examples ``start`` .. ``start + limit - 1`` (or to the end) in id order."""
        if batch_size < 1:
            raise UsageError(f"batch_size ({batch_size}) must be at least 1")
        if not 0 <= start <= len(self):
            raise UsageError(
                f"start ({start}) is out of range for dataset {self.name!r} ({len(self)} examples)"
            )
        if limit is not None and limit < 0:
            raise UsageError(f"limit ({limit}) must not be negative")
        stop = len(self) if limit is None else min(len(self), start + limit)
        for first in range(start, stop, batch_size):
            last = min(stop, first + batch_size)
            rows = self._rows(first, last)
            width = max(len(r) for r in rows)
            tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                if len(row) == 0:
                    raise UsageError(f"example {first + j} of dataset {self.name!r} has no"
                                     " tokens")
                tokens[j, : len(row)] = torch.from_numpy(row.astype(np.int64))
                mask[j, : len(row)] = 1
            yield Batch(torch.arange(first, last, dtype=torch.long), tokens, mask)

    def fingerprint(self, cancel: Any = None) -> str:
        """sha256 over the examples' lengths and token ids (not the name, not the pad id):
        equal datasets have equal fingerprints, wherever their ids live.

        One definition for every dataset (the model card's held-out fingerprint was taken on
        an in-memory dataset; the same examples cut from a token file must match it). A file
        is hashed in pieces, never held whole; ``cancel`` (an Event) stops between pieces.
        """
        if self._fingerprint is None:
            h = hashlib.sha256()
            if self._in_memory:
                offs = self._offsets.array
                h.update(np.diff(offs).astype("<i8").tobytes())
                h.update(self._tokens.array.astype("<i4").tobytes())
            else:
                step = 1 << 16
                for first in range(0, len(self), step):
                    _check_cancel(cancel)
                    bounds = self._bounds(first, min(len(self), first + step))
                    h.update(np.array([b - a for a, b in bounds], dtype="<i8").tobytes())
                for first in range(0, len(self), step):
                    _check_cancel(cancel)
                    rows = self._rows(first, min(len(self), first + step))
                    h.update(np.concatenate(rows).astype("<i4").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint


def _check_cancel(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled while fingerprinting the dataset")
