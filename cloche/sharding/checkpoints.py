"""Checkpoints of a sharded dataset run: every rank's part, valid only where every rank has it.

Each rank holds the reducers and entries of the points it owns, so each rank checkpoints its own
pending writes (``probes.checkpoint.Checkpoints`` in its ``rank-<r>`` state folder, or memory).
They checkpoint at the same batch boundaries (every rank runs every batch), and after writing one
each rank waits until every rank wrote it — a short pipeline drain every ``checkpoint_every``
batches — so no two ranks are ever more than one checkpoint apart. A resume first agrees: every
rank publishes which checkpoints it holds (its last and the one before) and all restore the last
one that every rank holds, or, when some rank holds none, all start over. A cancel or a lost rank
between two ranks' writes therefore never resumes a run half from one checkpoint and half from
another.
"""

from __future__ import annotations

import json

from cloche.probes.checkpoint import Checkpoint, Checkpoints
from cloche.sharding.control import Control

__all__ = ["AgreedCheckpoints"]


class AgreedCheckpoints:
    """A rank's ``Checkpoints`` for one sharded command ``seq``, with the ranks' agreement.

    Stands in for ``Checkpoints`` in ``runtime.datasets.Resumable``: ``write`` returns once
    every rank wrote the same checkpoint, ``read`` returns the checkpoint all ranks restore.
    """

    def __init__(self, inner: Checkpoints, control: Control, seq: int, rank: int,
                 world_size: int) -> None:
        self._inner = inner
        self._control = control
        self._seq = seq
        self._rank = rank
        self._world = world_size
        self._published: list[str] = []

    def _key(self, what: str, rank: int) -> str:
        return f"ckpt/{self._seq}/{what}/{rank}"

    def _exchange(self, what: str, value: str) -> list[str]:
        """Publish ``value`` and return every rank's (waits for all; stops on an abort)."""
        store = self._control.store
        mine = self._key(what, self._rank)
        store.set(mine, value)
        values = [value if r == self._rank else
                  self._control.wait(self._key(what, r), command=self._seq).decode()
                  for r in range(self._world)]
        # every rank has now published ``what``, so it finished reading the exchanges before it:
        # this rank's keys of those can go (the control store would grow with each checkpoint)
        for old in self._published:
            store.delete_key(old)
        self._published = [mine]
        return values

    def least(self, what: str, value: int) -> int:
        """The smallest of every rank's ``value`` (e.g. where an export resumes)."""
        return min(int(v) for v in self._exchange(what, str(value)))

    def write(self, save: str, ckpt: Checkpoint, *, first: bool) -> None:
        self._inner.write(save, ckpt, first=first)
        self._exchange(f"w{ckpt.next_example}", "1")  # a barrier: every rank wrote it

    def read(self, save: str) -> Checkpoint | None:
        held = [set(json.loads(v)) for v in
                self._exchange("held", json.dumps(self._inner.available(save)))]
        common = set.intersection(*held)
        if not common:  # some rank has none of them: every rank starts over
            return None
        return self._inner.read(save, at=max(common))

    def drop(self, save: str) -> None:
        self._inner.drop(save)
