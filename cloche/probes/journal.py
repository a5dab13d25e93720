"""Save contexts that survive a crash: every commit is on disk before anybody sees it.

``cloche serve --state-dir DIR`` (or ``cloche.load(..., state_dir=DIR)``) gives the store a
:class:`Journal`. A commit writes what it changes in each save context — the entries it
appended, the reducers it touched (their merged state), ``ctx.state`` if it changed, the run and
example counts — as one file in the context's folder, in the format of ``probes.disk``, and then
the folder's manifest, which lists the files in commit order. Both writes are atomic (temporary
name, fsync, rename), and the commit becomes visible in memory only after them: a ``kill -9``
at any moment leaves either the old manifest or the new one, and a committed run is never lost.
Files that no manifest lists (a commit interrupted half-way) are removed when the journal opens.

Reading a folder back folds its files in order: entries are appended, the last reducer state and
``ctx.state`` win, counts add up. Every ``COMPACT_EVERY`` commits a folder's files but the last
are rewritten as one, so superseded reducer states do not pile up. The last commit always stays
a file of its own, with its transaction's tag: :meth:`Journal.undo_after` can take it back (a
sharded group restarted after a crash in the middle of a commit makes its ranks agree so).
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.parse
from pathlib import Path
from typing import Any

from cloche.errors import ResourceLimit, UsageError
from cloche.probes.disk import atomic_write, read_context, read_extra, write_context
from cloche.probes.store import Change, SaveContext

__all__ = ["COMPACT_EVERY", "Change", "Journal"]

COMPACT_EVERY = 32
_MANIFEST = "manifest.json"
_COMMITTED = "committed-transaction"
_VERSION = 1


class Journal:
    """The save contexts of one store, on disk under ``root`` (one folder per context)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        try:
            (self.root / "contexts").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot use {self.root} as a state directory: {exc}") from exc
        self._manifests: dict[str, dict[str, Any]] = {}

    def _folder(self, name: str) -> Path:
        return self.root / "contexts" / urllib.parse.quote(name, safe="")

    # ----------------------------------------------------------------- reading
    def load(self) -> list[SaveContext]:
        """Every context on disk, as committed (and the leftovers of interrupted commits gone)."""
        contexts = []
        for folder in sorted((self.root / "contexts").iterdir()):
            manifest_path = folder / _MANIFEST
            if not manifest_path.exists():  # a context whose first commit never completed
                shutil.rmtree(folder, ignore_errors=True)
                continue
            manifest = json.loads(manifest_path.read_text())
            if manifest.get("version") != _VERSION:
                raise UsageError(f"{folder} was written by another version of cloche")
            listed = set(manifest["files"])
            for stray in folder.iterdir():
                if stray.name != _MANIFEST and stray.name not in listed:
                    stray.unlink(missing_ok=True)
            manifest.setdefault("tags", [None] * len(manifest["files"]))
            name = manifest["name"]
            ctx = SaveContext(name)
            for file in manifest["files"]:
                _fold(ctx, folder / file)
            self._manifests[name] = manifest
            contexts.append(ctx)
        return contexts

    # ----------------------------------------------------------------- writing
    def record(self, change: Change, current: SaveContext, *, tag: str | None = None) -> None:
        """Write ``change`` (before it is applied to ``current``, the committed context)."""
        delta = SaveContext(change.name)
        delta.entries = change.entries
        delta.reducers = change.reducers
        delta.state = change.state if change.state is not None else {}
        delta.num_runs, delta.num_examples = change.runs, change.examples
        delta.order = change.order
        folder = self._folder(change.name)
        manifest = self._manifests.get(change.name)
        try:
            folder.mkdir(exist_ok=True)
            if manifest is None:
                manifest = {"version": _VERSION, "name": change.name, "files": [], "tags": [],
                            "next": 1}
            file = f"{manifest['next']:08d}.safetensors"
            write_context(delta, folder / file, extra={"state_changed": change.state is not None})
            updated = {**manifest, "files": [*manifest["files"], file],
                       "tags": [*manifest["tags"], tag], "next": manifest["next"] + 1}
            _write_manifest(folder, updated)
        except OSError as exc:  # nothing was applied: the run is rolled back
            raise ResourceLimit(f"cannot write save context {change.name!r} to the state"
                                f" directory {self.root}: {exc}") from exc
        self._manifests[change.name] = updated
        if len(updated["files"]) > COMPACT_EVERY:
            self._compact(current, folder)

    def _compact(self, before: SaveContext, folder: Path) -> None:
        """Rewrite every file but the last as one: ``before``, the context before that commit."""
        manifest = self._manifests[before.name]
        file = f"{manifest['next']:08d}.safetensors"
        try:
            write_context(before, folder / file, extra={"state_changed": True})
            updated = {**manifest, "files": [file, manifest["files"][-1]],
                       "tags": [manifest["tags"][-2], manifest["tags"][-1]],
                       "next": manifest["next"] + 1}
            _write_manifest(folder, updated)
        except OSError:
            return  # the uncompacted files are still complete: try again at the next commit
        self._manifests[before.name] = updated
        for old in manifest["files"][:-1]:
            (folder / old).unlink(missing_ok=True)

    # ----------------------------------------------------------------- in-doubt commits
    def committed(self) -> str | None:
        """The tag of the last transaction this store's group committed as a whole (or None)."""
        path = self.root / _COMMITTED
        return path.read_text() if path.exists() else None

    def mark_committed(self, tag: str) -> None:
        """Record that transaction ``tag`` is committed on every rank (rank 0 writes it last)."""
        atomic_write(self.root / _COMMITTED, lambda tmp: Path(tmp).write_text(tag))

    def undo_after(self, committed: str | None) -> dict[str, SaveContext | None]:
        """Take back every commit tagged later than ``committed``; the contexts as they are now.

        Tags order like the transactions that made them (see ``ShardedExecutor``); an untagged
        commit (a restore, a single-process store) is never in doubt and stays.
        """
        changed: dict[str, SaveContext | None] = {}
        for name in list(self._manifests):
            while self._in_doubt(name, committed):
                changed[name] = self._undo_last(name)
        return changed

    def _in_doubt(self, name: str, committed: str | None) -> bool:
        manifest = self._manifests.get(name)
        if manifest is None or not manifest["tags"]:
            return False
        last = manifest["tags"][-1]
        return last is not None and (committed is None or last > committed)

    def _undo_last(self, name: str) -> SaveContext | None:
        manifest = self._manifests[name]
        if len(manifest["files"]) <= 1:
            self.drop(name)
            return None
        folder = self._folder(name)
        updated = {**manifest, "files": manifest["files"][:-1], "tags": manifest["tags"][:-1]}
        _write_manifest(folder, updated)
        self._manifests[name] = updated
        (folder / manifest["files"][-1]).unlink(missing_ok=True)
        ctx = SaveContext(name)
        for file in updated["files"]:
            _fold(ctx, folder / file)
        return ctx

    def replace(self, ctx: SaveContext) -> None:
        """Make ``ctx`` the whole content of its context on disk (a restore)."""
        self.drop(ctx.name)
        change = Change(ctx.name, {k: list(v) for k, v in ctx.entries.items()},
                        dict(ctx.reducers), dict(ctx.state), ctx.num_runs, ctx.num_examples,
                        {k: list(v) for k, v in ctx.order.items()})
        self.record(change, SaveContext(ctx.name))

    def drop(self, name: str) -> None:
        """Forget a context (cleared, or its session expired)."""
        self._manifests.pop(name, None)
        folder = self._folder(name)
        if folder.exists():
            (folder / _MANIFEST).unlink(missing_ok=True)  # atomic: it no longer exists
            shutil.rmtree(folder, ignore_errors=True)


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest)
    atomic_write(folder / _MANIFEST, lambda tmp: Path(tmp).write_text(text))


def _fold(ctx: SaveContext, path: Path) -> None:
    delta = read_context(path, ctx.name)
    for key, values in delta.entries.items():
        ctx.entries.setdefault(key, []).extend(values)
    for key, order in delta.order.items():
        ctx.order.setdefault(key, []).extend(order)
    ctx.reducers.update(delta.reducers)
    if read_extra(path).get("state_changed"):
        ctx.state = delta.state
    ctx.num_runs += delta.num_runs
    ctx.num_examples += delta.num_examples
