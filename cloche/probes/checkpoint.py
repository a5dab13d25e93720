"""Checkpoints of unfinished dataset runs: their pending writes, kept aside until they commit.

A dataset run is one transaction: its save context changes only when the whole run commits.
``run_dataset(checkpoint_every=N)`` keeps that, and every N batches also copies the run's
*pending* writes — the staged reducers (not merged into the committed ones), ``ctx.state``, the
entries saved so far, the counts — with its place in the dataset into a :class:`Checkpoints`
store. A resumed run loads them back into a fresh transaction and goes on from the next batch,
so every reducer sees the same updates in the same order as in an uninterrupted run, and the
final commit is bit for bit the same.

With a state dir (``--state-dir``) checkpoints are files under ``<state-dir>/runs/<context>/``
in the format of ``probes.disk``: one file per checkpoint with the entries saved since the last
one and the whole reducer and state snapshot, listed by a manifest written last (atomically),
so a ``kill -9`` leaves the previous checkpoint or the new one. Without a state dir they live in
memory (a cancelled run can still resume; a crash loses them).
"""

from __future__ import annotations

import copy
import json
import shutil
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloche.errors import ResourceLimit
from cloche.probes.disk import atomic_write, read_context, read_extra, write_context
from cloche.probes.store import PendingWrites, SaveContext

__all__ = ["Checkpoint", "Checkpoints"]

_MANIFEST = "manifest.json"


@dataclass
class Checkpoint:
    """A dataset run's pending writes after its first ``next_example`` examples."""

    identity: dict[str, Any]  # what the run is (dataset fingerprint, batch size, ...)
    next_example: int
    totals: dict[str, int]
    pending: SaveContext
    state_changed: bool = False
    written: dict[str, int] = field(default_factory=dict)  # entries per key already on disk

    @classmethod
    def of(cls, writes: PendingWrites, identity: dict[str, Any], next_example: int,
           totals: dict[str, int]) -> Checkpoint:
        """A snapshot of ``writes`` (copies: the run goes on changing them)."""
        pending = SaveContext("pending")
        pending.entries = {k: list(v) for k, v in writes.saves.items()}
        pending.order = {k: list(v) for k, v in writes.order.items()}
        pending.reducers = {k: copy.deepcopy(r) for k, r in writes.reducers.items()}
        changed = writes._state is not None
        pending.state = copy.deepcopy(writes._state) if writes._state is not None else {}
        pending.num_runs, pending.num_examples = writes.runs, writes.examples
        return cls(dict(identity), next_example, dict(totals), pending, changed)

    def restore(self, writes: PendingWrites) -> None:
        """Put the snapshot into a fresh run's ``writes`` (its transaction is charged again)."""
        for key, values in self.pending.entries.items():
            for value in values:
                writes._transaction.charge(value.numel() * value.element_size(),
                                           writes._committed.name)
            writes.saves[key] = list(values)
        writes.order = {k: list(v) for k, v in self.pending.order.items()}
        writes.reducers = {k: copy.deepcopy(r) for k, r in self.pending.reducers.items()}
        writes._state = copy.deepcopy(self.pending.state) if self.state_changed else None
        writes.runs, writes.examples = self.pending.num_runs, self.pending.num_examples


class Checkpoints:
    """The checkpoints of unfinished dataset runs, one per save context (disk or memory)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = None if root is None else Path(root)
        self._memory: dict[str, Checkpoint] = {}
        self._previous: dict[str, Checkpoint] = {}  # the one before (see ``available``)
        self._written: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    def _folder(self, save: str) -> Path:
        assert self.root is not None
        return self.root / urllib.parse.quote(save, safe="")

    def write(self, save: str, ckpt: Checkpoint, *, first: bool) -> None:
        """Keep ``ckpt`` as the last checkpoint of ``save`` (``first``: of a fresh run)."""
        with self._lock:
            if self.root is None:
                last = self._memory.get(save)
                if last is not None and not first:
                    self._previous[save] = last
                else:
                    self._previous.pop(save, None)
                self._memory[save] = ckpt
                return
            if first:
                self._drop(save)
            try:
                self._write_file(save, ckpt)
            except OSError as exc:
                raise ResourceLimit(f"cannot write a checkpoint of {save!r} to {self.root}:"
                                    f" {exc}") from exc

    def _write_file(self, save: str, ckpt: Checkpoint) -> None:
        folder = self._folder(save)
        folder.mkdir(parents=True, exist_ok=True)
        manifest_path = folder / _MANIFEST
        manifest: dict[str, Any] = (json.loads(manifest_path.read_text())
                                    if manifest_path.exists() else {"files": [], "next": 1})
        written = self._written.setdefault(save, {})
        delta = SaveContext(ckpt.pending.name)
        for key, values in ckpt.pending.entries.items():
            delta.entries[key] = values[written.get(key, 0):]
        for key, order in ckpt.pending.order.items():
            delta.order[key] = order[written.get(key, 0):]
        delta.reducers, delta.state = ckpt.pending.reducers, ckpt.pending.state
        delta.num_runs, delta.num_examples = ckpt.pending.num_runs, ckpt.pending.num_examples
        file = f"{manifest['next']:08d}.safetensors"
        meta = {"identity": ckpt.identity, "next_example": ckpt.next_example,
                "totals": ckpt.totals, "state_changed": ckpt.state_changed}
        write_context(delta, folder / file, extra={"checkpoint": meta})
        updated = {"files": [*manifest["files"], file], "next": manifest["next"] + 1}
        text = json.dumps(updated)
        atomic_write(manifest_path, lambda tmp: Path(tmp).write_text(text))
        self._written[save] = {k: len(v) for k, v in ckpt.pending.entries.items()}

    def available(self, save: str) -> list[int]:
        """The ``next_example`` of each checkpoint of ``save`` that :meth:`read` can return.

        The last one, and at least the one before it: a sharded run's ranks checkpoint one
        after another, and resume from the last checkpoint that every rank holds.
        """
        with self._lock:
            if self.root is None:
                kept = [self._previous.get(save), self._memory.get(save)]
                return [c.next_example for c in kept if c is not None]
            folder = self._folder(save)
            manifest_path = folder / _MANIFEST
            if not manifest_path.exists():
                return []
            files = json.loads(manifest_path.read_text())["files"]
            return [int(read_extra(folder / f)["checkpoint"]["next_example"]) for f in files]

    def read(self, save: str, at: int | None = None) -> Checkpoint | None:
        """The last checkpoint of ``save``, or None; ``at``: the one after example ``at`` (one
        of :meth:`available`), which becomes the last (later ones are dropped)."""
        with self._lock:
            if self.root is None:
                last = self._memory.get(save)
                if at is None or last is None or last.next_example == at:
                    return last
                previous = self._previous.pop(save, None)
                if previous is None or previous.next_example != at:
                    return None
                self._memory[save] = previous
                return previous
            folder = self._folder(save)
            manifest_path = folder / _MANIFEST
            if not manifest_path.exists():
                return None
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            if at is not None:
                files = self._cut(folder, manifest, at)
                if files is None:
                    return None
            pending = SaveContext("pending")
            meta: dict[str, Any] = {}
            for file in files:
                delta = read_context(folder / file, "pending")
                for key, values in delta.entries.items():
                    pending.entries.setdefault(key, []).extend(values)
                for key, order in delta.order.items():
                    pending.order.setdefault(key, []).extend(order)
                pending.reducers, pending.state = delta.reducers, delta.state
                pending.num_runs, pending.num_examples = delta.num_runs, delta.num_examples
                meta = read_extra(folder / file)["checkpoint"]
            self._written[save] = {k: len(v) for k, v in pending.entries.items()}
            return Checkpoint(meta["identity"], meta["next_example"], meta["totals"], pending,
                              meta["state_changed"])

    @staticmethod
    def _cut(folder: Path, manifest: dict[str, Any], at: int) -> list[str] | None:
        """The files up to the checkpoint after example ``at``; later ones leave the manifest."""
        files: list[str] = manifest["files"]
        ends = [int(read_extra(folder / f)["checkpoint"]["next_example"]) for f in files]
        if at not in ends:
            return None
        n = ends.index(at) + 1
        if n < len(files):
            text = json.dumps({"files": files[:n], "next": manifest["next"]})
            atomic_write(folder / _MANIFEST, lambda tmp: Path(tmp).write_text(text))
            for later in files[n:]:
                (folder / later).unlink(missing_ok=True)
        return files[:n]

    def drop(self, save: str) -> None:
        """Forget the checkpoint of ``save`` (its run committed, or starts afresh)."""
        with self._lock:
            self._drop(save)

    def _drop(self, save: str) -> None:
        self._memory.pop(save, None)
        self._previous.pop(save, None)
        self._written.pop(save, None)
        if self.root is not None:
            folder = self._folder(save)
            if folder.exists():
                (folder / _MANIFEST).unlink(missing_ok=True)
                shutil.rmtree(folder, ignore_errors=True)
