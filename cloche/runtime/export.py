"""Activation export: ``run_dataset(export=dir)`` writes activations to disk in shards.

Dictionaries (sparse autoencoders, transcoders) train on activations collected over millions of
tokens, which no save context should hold. The exporter attaches a probe at each export point
that copies the activations of real tokens (padding left out) in ``export_dtype`` to the CPU;
every ``batches_per_shard`` batches it hands the shard to a writer thread, which writes one
safetensors file — a tensor per point ``(tokens, ...)`` plus ``example_ids`` and ``positions``
``(tokens,)`` — and then the folder's ``manifest.json``, both atomically (temporary name, fsync,
rename). The forward pass goes on meanwhile; at most two shards wait for the disk.

Shard ``k`` always holds batches ``k * batches_per_shard`` .. of the run, so a shard is a fixed
piece of the dataset: a manifest lists only complete shards, files it does not list (a shard cut
off by a cancel or a ``kill -9``) are removed when the export is opened again, and the same call
skips the listed shards — an export resumes by itself. The manifest's ``run`` (dataset
fingerprint, points, dtype, batch and shard sizes) must match, or the folder is refused rather
than mixed.

Manifest (``manifest.json``)::

    {"format": "cloche.export/1", "run": {...}, "points": {point: {"shape": [...], "dtype"}},
     "shards": [{"file", "index", "examples": [first, stop], "tokens"}], "complete": bool}
"""

from __future__ import annotations

import json
import math
import queue
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from cloche.errors import ResourceLimit, UsageError
from cloche.probes.disk import atomic_write

__all__ = ["FORMAT", "Exporter", "batches_per_shard"]

FORMAT = "cloche.export/1"
_MANIFEST = "manifest.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def batches_per_shard(shard_tokens: int, batch_size: int, seq_len: int) -> int:
    """How many batches make one shard of about ``shard_tokens`` tokens."""
    return max(1, math.ceil(shard_tokens / (batch_size * seq_len)))


class Exporter:
    """The export of one dataset run into ``folder`` (on the machine the model runs on)."""

    def __init__(self, folder: str, points: tuple[str, ...] | list[str], dtype: str,
                 shard_tokens: int, ds: Any, batch_size: int, limit: int | None,
                 micro_batches: int) -> None:
        self.folder = Path(folder).expanduser()
        self.points = list(dict.fromkeys(points))
        self.dtype = _DTYPES[dtype]
        self.batch_size = batch_size
        self.per_shard = batches_per_shard(shard_tokens, batch_size, ds.seq_len)
        self.stop = len(ds) if limit is None else min(limit, len(ds))
        self.run = {"dataset": ds.name, "fingerprint": ds.fingerprint(), "seq_len": ds.seq_len,
                    "batch_size": batch_size, "batches_per_shard": self.per_shard,
                    "limit": limit, "points": self.points, "dtype": dtype}
        self.manifest = self._open()
        self.done = {s["index"] for s in self.manifest["shards"]}
        self.written = 0
        self._shard: int | None = None
        self._active = False
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._ids: list[torch.Tensor] = []
        self._positions: list[torch.Tensor] = []
        self._first = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(maxsize=2)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._write_loop, name="cloche-export",
                                        daemon=True)
        self._writer.start()

    # ----------------------------------------------------------------- the folder
    def _open(self) -> dict[str, Any]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create the export folder {self.folder}: {exc}") from exc
        path = self.folder / _MANIFEST
        if not path.exists():
            if any(self.folder.iterdir()):
                leftovers = [p for p in self.folder.iterdir() if not p.name.startswith(".")]
                if leftovers:
                    raise UsageError(f"the export folder {self.folder} holds files but no"
                                     f" {_MANIFEST}: export into an empty or new folder")
            fresh: dict[str, Any] = {"format": FORMAT, "run": self.run, "points": {},
                                     "shards": [], "complete": False}
            self._write_manifest(fresh)
            return fresh
        try:
            found: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read {path}: {exc}") from exc
        manifest = found
        if manifest.get("format") != FORMAT:
            raise UsageError(f"{path} is not a cloche export manifest")
        differ = sorted(k for k in self.run if manifest["run"].get(k) != self.run[k])
        if differ:
            raise UsageError(
                f"the export folder {self.folder} holds another export (its {', '.join(differ)}"
                " differ): export into a new folder, or repeat the exact call to resume it")
        listed = {s["file"] for s in manifest["shards"]}
        for stray in self.folder.iterdir():  # shards cut off by a cancel or a crash
            if stray.name != _MANIFEST and stray.name not in listed:
                stray.unlink(missing_ok=True)
        return manifest

    def _write_manifest(self, manifest: dict[str, Any]) -> None:
        text = json.dumps(manifest, indent=1)
        atomic_write(self.folder / _MANIFEST, lambda tmp: Path(tmp).write_text(text))

    def aligned(self, batches_done: int) -> bool:
        """Whether a checkpoint may fall after ``batches_done`` batches: at a shard's end, so
        that a resumed run starts a shard from its first batch."""
        return batches_done % self.per_shard == 0

    def resume_from(self) -> int:
        """The first example of the first shard not yet written (shards are written in order)."""
        k = 0
        while k in self.done:
            k += 1
        return min(self.stop, k * self.per_shard * self.batch_size)

    # ----------------------------------------------------------------- collecting
    def probes(self) -> dict[str, Any]:
        """One probe per export point (added after the run's own probes at that point)."""
        return {point: self._probe(point) for point in self.points}

    def _probe(self, point: str) -> Any:
        def export(ctx: Any, x: torch.Tensor) -> None:
            if not self._active:
                return
            mask = ctx.attention_mask
            if mask is None or x.dim() < 2 or tuple(x.shape[:2]) != tuple(mask.shape):
                raise UsageError(f"export point {point!r} has shape {tuple(x.shape)}; exports"
                                 " take points shaped (batch, seq, ...)")
            self._parts.setdefault(point, []).append(
                x.detach()[mask.to(torch.bool)].to(self.dtype).cpu())
        return export

    def begin_batch(self, batch: Any) -> None:
        index = int(batch.example_ids[0]) // self.batch_size
        shard = index // self.per_shard
        if shard != self._shard:
            if index % self.per_shard and shard not in self.done:
                raise UsageError(f"the export cannot start shard {shard} in its middle (batch"
                                 f" {index}): resume from a checkpoint at a shard's end")
            self._shard, self._first = shard, int(batch.example_ids[0])
            self._parts, self._ids, self._positions = {}, [], []
        self._active = shard not in self.done
        if self._active:
            mask = batch.attention_mask.to(torch.bool)
            rows, cols = mask.nonzero(as_tuple=True)
            self._ids.append(batch.example_ids[rows])
            self._positions.append(cols.to(torch.int32))

    def end_batch(self, batch: Any) -> None:
        self._raise_writer_error()
        if not self._active:
            return
        last = int(batch.example_ids[-1]) + 1
        index = (last - 1) // self.batch_size
        if (index + 1) % self.per_shard == 0 or last >= self.stop:
            self._hand_off(last)

    def _hand_off(self, stop: int) -> None:
        assert self._shard is not None
        ids = torch.cat(self._ids)
        tensors = {"example_ids": ids, "positions": torch.cat(self._positions)}
        for point in self.points:
            parts = self._parts.get(point)
            if not parts:
                raise UsageError(f"export point {point!r} was not reached in this run")
            tensors[point] = torch.cat(parts)
            if tensors[point].shape[0] != ids.shape[0]:
                raise UsageError(f"export point {point!r} gave {tensors[point].shape[0]} token"
                                 f" rows for {ids.shape[0]} tokens")
        shard = {"index": self._shard, "file": f"shard-{self._shard:06d}.safetensors",
                 "examples": [self._first, stop], "tokens": int(ids.shape[0]),
                 "tensors": tensors}
        self._parts, self._ids, self._positions = {}, [], []
        self._active = False
        self._queue.put(shard)
        self.written += 1

    # ----------------------------------------------------------------- writing
    def _write_loop(self) -> None:
        while True:
            shard = self._queue.get()
            if shard is None:
                return
            if self._error is not None:
                continue
            try:
                self._write(shard)
            except BaseException as exc:  # noqa: BLE001 - reported on the run's thread
                self._error = exc

    def _write(self, shard: dict[str, Any]) -> None:
        tensors = shard.pop("tensors")
        path = self.folder / shard["file"]
        try:
            atomic_write(path, lambda tmp: save_file(tensors, tmp,
                                                     metadata={"format": FORMAT}))
        except OSError as exc:
            raise ResourceLimit(f"cannot write export shard {path}: {exc}") from exc
        points = self.manifest["points"] or {
            p: {"shape": list(tensors[p].shape[1:]), "dtype": str(tensors[p].dtype)
                .removeprefix("torch.")} for p in self.points}
        shards = sorted([*self.manifest["shards"], shard], key=lambda s: s["index"])
        manifest = {**self.manifest, "points": points, "shards": shards}
        self._write_manifest(manifest)
        self.manifest = manifest
        self.done.add(shard["index"])

    def _raise_writer_error(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, *, complete: bool) -> dict[str, Any]:
        """Wait for the shards handed off; mark the export complete if ``complete``."""
        self._queue.put(None)
        self._writer.join()
        self._raise_writer_error()
        if complete:
            expected = math.ceil(math.ceil(self.stop / self.batch_size) / self.per_shard)
            if len(self.done) >= expected and not self.manifest["complete"]:
                self.manifest = {**self.manifest, "complete": True}
                self._write_manifest(self.manifest)
        return {"dir": str(self.folder), "shards": len(self.manifest["shards"]),
                "written": self.written,
                "tokens": sum(s["tokens"] for s in self.manifest["shards"]),
                "complete": bool(self.manifest["complete"])}
