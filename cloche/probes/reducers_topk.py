"""``TopK``: the k most (or least) activating samples per unit, with where they came from.

This is what dataset-example pages are built from: for every unit, the k values with their
stable example id and token position. The order is total — value first, then the lower
example id, then the lower position — so the kept set does not depend on how the data was
split into batches or ranks, and merging partial top-k lists is exact.

Each update selects a per-unit candidate set from the batch with ``torch.topk`` (ties at the
k-th value are resolved by row order, which is made equal to (example id, position) order),
then merges it with the kept rows by a stable lexicographic sort over at most 2k rows.
The batch is worked on unit-major, (d, n), where topk and cumsum run fastest.
"""

from __future__ import annotations

import torch

from cloche.errors import UsageError
from cloche.probes.reducers_base import Reducer, check_int

__all__ = ["TopK"]

_F64 = torch.float64
_I64 = torch.int64


class TopK(Reducer):
    """Per unit, the ``k`` largest (``largest=False``: smallest) values with their origin.

    ``update(x, example_ids=ids, mask=...)`` takes ``x`` as (batch, seq, d) — position is the
    seq index — or (batch, d) — position -1 — and ``ids`` (batch,) integer example ids.
    Ties rank the lower example id first, then the lower position. NaN values are not
    supported (their rank is unspecified).

    Result: ``count`` (rows seen), ``values`` (m, d) float64 best first, ``example_ids`` and
    ``positions`` (m, d) int64, where m = min(k, count).
    """

    kind = "topk"
    _config_keys = ("k", "largest")
    _growing = ("values", "example_ids", "positions")

    def __init__(self, k: int, largest: bool = True) -> None:
        super().__init__()
        self.k = check_int("TopK", "k", k, 1)
        if not isinstance(largest, bool):
            raise UsageError(f"TopK: largest must be a bool, got {largest!r}")
        self.largest = largest

    def _init_state(self, d: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "values": torch.zeros(0, d, dtype=_F64, device=device),
            "example_ids": torch.zeros(0, d, dtype=_I64, device=device),
            "positions": torch.zeros(0, d, dtype=_I64, device=device),
        }

    def update(
        self,
        x: torch.Tensor,
        *,
        example_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Fold a batch in; ``example_ids`` is required (see the class docstring)."""
        key, ids, pos = self._flatten(x, example_ids, mask)
        d, n = key.shape
        if n == 0:
            return
        if not self.largest:
            key.neg_()  # our own copy; negation is exact, so it is undone exactly below
        kk = min(self.k, n)
        if kk < n:
            pick = self._pick_columns(key, kk)  # (d, kk) sample indices
        else:
            pick = torch.arange(n, device=key.device).expand(d, n)
        values = key.gather(1, pick)
        if not self.largest:
            values.neg_()
        self._fold(values.T.to(_F64), ids[pick].T, pos[pick].T)
        self._count += n

    def _flatten(
        self, x: torch.Tensor, example_ids: torch.Tensor | None, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Validate the inputs; return the kept values transposed, (d, n), ids and positions (n,).

        Samples come out ordered by (example id, position), so that sample order is tie order.
        The values are a fresh copy laid out unit-major, which is where topk and cumsum are fast.
        """
        me = self._describe()
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(
                f"{me}.update expects x of shape (batch, seq, d) or (batch, d), got {shape}"
            )
        if x.is_complex():
            raise UsageError(f"{me}.update does not take complex tensors")
        if example_ids is None:
            raise UsageError(f"{me}.update needs example_ids: one integer id per batch row")
        ids = torch.as_tensor(example_ids)
        if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
            raise UsageError(f"{me}.update: example_ids must be integers, got {ids.dtype}")
        batch, d = x.shape[0], x.shape[-1]
        if tuple(ids.shape) != (batch,):
            raise UsageError(
                f"{me}.update: example_ids has shape {tuple(ids.shape)}, "
                f"expected ({batch},) — one id per batch row"
            )
        self._fix_d(d, x.device)
        device = self.device
        seq = x.shape[1] if x.dim() == 3 else 1
        rows = x.reshape(-1, d)
        if not rows.is_floating_point():
            rows = rows.to(_F64)
        rows = rows.to(device)
        ids = ids.to(device=device, dtype=_I64).repeat_interleave(seq)
        if x.dim() == 3:
            pos = torch.arange(seq, device=device).repeat(batch)
        else:
            pos = torch.full((batch,), -1, dtype=_I64, device=device)
        keep = None
        if mask is not None:
            kept = self._mask(mask, x.shape[:-1]).to(device).reshape(-1)
            if not bool(kept.all()):  # an all-true mask (no padding) keeps every row as it is
                keep = kept.nonzero().squeeze(1)
                ids, pos = ids[keep], pos[keep]
        # (id, position) order: positions already ascend within a batch row, so a stable
        # sort on ids suffices unless an id repeats across rows; sorting by position first
        # makes it right in that case too.
        order = torch.argsort(pos, stable=True)
        order = order[torch.argsort(ids[order], stable=True)]
        if keep is None and bool((order == torch.arange(len(order), device=device)).all()):
            # rows already in (id, position) order (ascending ids, no padding): a plain
            # transposing copy, several times cheaper than the gather below
            return rows.T.clone(memory_format=torch.contiguous_format), ids, pos
        ids, pos = ids[order], pos[order]
        values = rows.T.index_select(1, order if keep is None else keep[order])
        return values, ids, pos

    def _pick_columns(self, key: torch.Tensor, kk: int) -> torch.Tensor:
        """Per unit (row of ``key``, (d, n)), the kk samples with the largest key.

        Ties at the kk-th value go to the earlier samples: everything above the threshold is
        taken, then tied samples in order until kk are chosen.
        """
        n = key.shape[1]
        if kk < n:
            # Usually the kk-th value is strictly above the next one in every unit: then the
            # kk largest are chosen whatever the tie order, and one topk gives them.
            top = torch.topk(key, kk + 1, dim=1, sorted=True)
            if bool((top.values[:, kk - 1] > top.values[:, kk]).all()):
                return top.indices[:, :kk]
        threshold = torch.topk(key, kk, dim=1, sorted=False).values.amin(1, keepdim=True)
        above = key > threshold
        at = key == threshold
        room = kk - above.sum(1, keepdim=True, dtype=torch.int32)  # tied samples that still fit
        chosen = above | (at & (at.cumsum(1, dtype=torch.int32) <= room))
        # Exactly kk samples are chosen per unit; topk on (n - index) among them recovers them.
        index_dtype = torch.int32 if n < 2**31 - 1 else _I64
        rank = torch.arange(n, 0, -1, dtype=index_dtype, device=key.device)
        return torch.topk(torch.where(chosen, rank, 0), kk, dim=1, sorted=False).indices

    def _fold(self, values: torch.Tensor, ids: torch.Tensor, pos: torch.Tensor) -> None:
        """Merge candidate rows (m, d) into the kept rows: sort lexicographically, keep k.

        Worked on unit-major (d, m) copies, where the sorts run along contiguous rows. When
        no two of a unit's values tie, the value sort alone is the lexicographic order; only
        otherwise are the example ids and positions sorted too.
        """
        if self._state["values"].shape[0]:
            values = torch.cat([self._state["values"], values])
            ids = torch.cat([self._state["example_ids"], ids])
            pos = torch.cat([self._state["positions"], pos])
        values, ids, pos = values.T.contiguous(), ids.T.contiguous(), pos.T.contiguous()
        order = torch.argsort(values, dim=1, descending=self.largest, stable=True)
        ordered = values.gather(1, order)
        if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
            # Least significant key first; stable sorts keep the earlier keys' order on ties.
            order = torch.argsort(pos, dim=1, stable=True)
            order = order.gather(1, torch.argsort(ids.gather(1, order), dim=1, stable=True))
            order = order.gather(1, torch.argsort(values.gather(1, order), dim=1,
                                                  descending=self.largest, stable=True))
            ordered = values.gather(1, order)
        order = order[:, : self.k]
        self._state = {
            "values": ordered[:, : self.k].T.contiguous(),
            "example_ids": ids.gather(1, order).T.contiguous(),
            "positions": pos.gather(1, order).T.contiguous(),
        }

    def _update_rows(self, rows: torch.Tensor, n: int) -> None:  # pragma: no cover
        raise AssertionError("TopK overrides update()")

    def _merge_state(self, other: dict[str, torch.Tensor], n_other: int) -> None:
        self._fold(other["values"], other["example_ids"], other["positions"])

    def _check_loaded(self) -> None:
        shapes = {tuple(t.shape) for t in self._state.values()}
        m = self._state["values"].shape[0]
        if len(shapes) != 1 or m != min(self.k, self._count):
            raise UsageError(
                f"{self._describe()} state is inconsistent: tensor shapes "
                f"{sorted(shapes)} for k={self.k}, count={self._count}"
            )

    def _result(self) -> dict[str, torch.Tensor]:
        return {
            "count": torch.tensor(self._count, dtype=_I64),
            **{k: v.clone() for k, v in self._state.items()},
        }
