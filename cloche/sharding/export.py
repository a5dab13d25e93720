"""Activation export from a sharded model: each rank writes the points it owns.

``run_dataset(export=dir)`` on a sharded model gives every rank that owns an export point its
own ``runtime.export.Exporter`` in ``<dir>/rank-<r>/`` — a complete single-process export of
those points (its own ``manifest.json``, shards with the same ``example_ids``, ``positions``
and example ranges as one process writes), resumed by itself like one. ``<dir>/manifest.json``
(written here, on rank 0's machine) says which rank's folder holds which point::

    {"format": "cloche.export.sharded/1", "points": {point: "rank-<r>"},
     "ranks": {"<r>": {"dir": "rank-<r>", "points": [...]}}}

A resumed export must have the same owners (the same sharding plan), or it is refused; so is a
folder that holds a single-process export.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloche.errors import UsageError
from cloche.probes.disk import atomic_write

__all__ = ["FORMAT", "export_summary", "open_sharded_export"]

FORMAT = "cloche.export.sharded/1"
_MANIFEST = "manifest.json"


def open_sharded_export(req: Any, owner_of: Callable[[str], int]) -> dict[str, Any] | None:
    """What every rank needs to export (None without ``export=``); writes the top manifest."""
    if req.export is None:
        return None
    points = list(dict.fromkeys(req.export_points))
    owners = {p: owner_of(p) for p in points}  # unknown points are refused here
    ranks: dict[str, dict[str, Any]] = {}
    for point, rank in owners.items():
        ranks.setdefault(str(rank), {"dir": f"rank-{rank}", "points": []})["points"].append(point)
    manifest = {"format": FORMAT, "points": {p: f"rank-{r}" for p, r in owners.items()},
                "ranks": dict(sorted(ranks.items(), key=lambda kv: int(kv[0])))}
    folder = Path(req.export).expanduser()
    path = folder / _MANIFEST
    if path.exists():
        try:
            found = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        if found.get("format") != FORMAT:
            raise UsageError(f"the export folder {folder} holds an export of a model in one"
                             " process: export from a sharded model into a new folder")
        if found != manifest:
            raise UsageError(f"the export folder {folder} holds an export whose points live on"
                             " other ranks (another sharding): export into a new folder")
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the export folder {folder}: {exc}") from exc
        if any(not p.name.startswith(".") for p in folder.iterdir()):
            raise UsageError(f"the export folder {folder} holds files but no {_MANIFEST}:"
                             " export into an empty or new folder")
        text = json.dumps(manifest, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return {"dir": str(folder), "points": points, "dtype": req.export_dtype,
            "shard_tokens": req.export_shard_tokens}


def export_summary(folder: str, parts: list[dict[str, Any] | None]) -> dict[str, Any]:
    """``out["export"]``: the ranks' exporters' summaries, and their totals."""
    ranks = {r: part for r, part in enumerate(parts) if part is not None}
    return {"dir": folder, "shards": sum(p["shards"] for p in ranks.values()),
            "written": sum(p["written"] for p in ranks.values()),
            "tokens": max((p["tokens"] for p in ranks.values()), default=0),
            "complete": all(p["complete"] for p in ranks.values()), "ranks": ranks}
