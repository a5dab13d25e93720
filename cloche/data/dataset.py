"""The :class:`Dataset` container and its :class:`Batch` (no I/O, no tokenizers here)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cloche.errors import UsageError

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

    Tokens are held in one flat int32 buffer with offsets, so millions of tokens cost little.
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
        self.name = name
        self.seq_len = seq_len
        self.pad_id = pad_id
        parts = [np.asarray(e, dtype=np.int64) for e in examples]
        flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= 2**31):
            raise UsageError(f"dataset {name!r} has token ids outside [0, 2**31)")
        self._tokens = torch.from_numpy(flat.astype(np.int32))
        self._offsets = torch.zeros(len(lengths) + 1, dtype=torch.long)
        if lengths:
            self._offsets[1:] = torch.tensor(lengths, dtype=torch.long).cumsum(0)
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        """The example with id ``i`` as a LongTensor of its (unpadded) token ids."""
        if isinstance(i, bool) or not isinstance(i, int):
            raise UsageError(f"example ids are ints, got {type(i).__name__}")
        if not 0 <= i < len(self):
            raise UsageError(
                f"example id {i} is out of range for dataset {self.name!r} ({len(self)} examples)"
            )
        return self._tokens[self._offsets[i] : self._offsets[i + 1]].long()

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, examples={len(self)}, seq_len={self.seq_len}, "
            f"tokens={self.num_tokens})"
        )

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

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
            ids = list(range(first, min(stop, first + batch_size)))
            rows = [self[i] for i in ids]
            width = max(len(r) for r in rows)
            tokens = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, row in enumerate(rows):
                tokens[j, : len(row)] = row
                mask[j, : len(row)] = 1
            yield Batch(torch.tensor(ids, dtype=torch.long), tokens, mask)

    def fingerprint(self) -> str:
        """sha256 over the examples' lengths and token ids (not the name, not the pad id)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self._offsets.diff().numpy().astype("<i8").tobytes())
            h.update(self._tokens.numpy().astype("<i4").tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint
