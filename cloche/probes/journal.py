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
``ctx.state`` win, counts add up. Every ``COMPACT_EVERY`` commits a folder is rewritten as one
file, so superseded reducer states do not pile up.
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
            name = manifest["name"]
            ctx = SaveContext(name)
            for file in manifest["files"]:
                _fold(ctx, folder / file)
            self._manifests[name] = manifest
            contexts.append(ctx)
        return contexts

    # ----------------------------------------------------------------- writing
    def record(self, change: Change, current: SaveContext) -> None:
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
                manifest = {"version": _VERSION, "name": change.name, "files": [], "next": 1}
            file = f"{manifest['next']:08d}.safetensors"
            write_context(delta, folder / file, extra={"state_changed": change.state is not None})
            updated = {**manifest, "files": [*manifest["files"], file],
                       "next": manifest["next"] + 1}
            _write_manifest(folder, updated)
        except OSError as exc:  # nothing was applied: the run is rolled back
            raise ResourceLimit(f"cannot write save context {change.name!r} to the state"
                                f" directory {self.root}: {exc}") from exc
        self._manifests[change.name] = updated
        if len(updated["files"]) >= COMPACT_EVERY:
            self._compact(change, current, folder)

    def _compact(self, change: Change, current: SaveContext, folder: Path) -> None:
        """Rewrite the folder as one file holding the whole context after this commit."""
        whole = SaveContext(change.name)
        whole.entries = {k: list(v) for k, v in current.entries.items()}
        for key, values in change.entries.items():
            whole.entries.setdefault(key, []).extend(values)
        whole.reducers = {**current.reducers, **change.reducers}
        whole.state = change.state if change.state is not None else current.state
        whole.order = {k: list(v) for k, v in current.order.items()}
        for key, order in change.order.items():
            whole.order.setdefault(key, []).extend(order)
        whole.num_runs = current.num_runs + change.runs
        whole.num_examples = current.num_examples + change.examples
        manifest = self._manifests[change.name]
        file = f"{manifest['next']:08d}.safetensors"
        try:
            write_context(whole, folder / file, extra={"state_changed": True})
            updated = {**manifest, "files": [file], "next": manifest["next"] + 1}
            _write_manifest(folder, updated)
        except OSError:
            return  # the uncompacted files are still complete: try again at the next commit
        self._manifests[change.name] = updated
        for old in manifest["files"]:
            (folder / old).unlink(missing_ok=True)

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
