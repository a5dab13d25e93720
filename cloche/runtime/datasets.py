"""Dataset iteration for ``run_dataset``: batches, progress and cancellation between batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from cloche.errors import Cancelled, UsageError

__all__ = ["Resumable", "as_dataset", "iterate", "open_export", "with_export_probes"]


def as_dataset(dataset: Any, tokenizer: Any, cancel: Any = None) -> Any:
    """A ``cloche.data.Dataset`` from a dataset, a dataset name or path, or a list of strings.

    A name is resolved here, where the model runs (``cloche.data.names``); tokenizing it (once,
    then cached on disk) stops with Cancelled when ``cancel`` is set.
    """
    from cloche import data

    if isinstance(dataset, data.Dataset):
        return dataset
    if isinstance(dataset, str) and _is_token_file(dataset):
        return data.get(dataset, tokenizer, cancel=cancel)  # token ids need no tokenizer
    if tokenizer is None and isinstance(dataset, (str, list, tuple)):
        # cloche.data would fall back to the default model's tokenizer: ids from another vocabulary
        raise UsageError("this model has no tokenizer: pass a cloche.data.Dataset of token ids"
                         " instead of texts or a dataset name")
    if isinstance(dataset, str):
        return data.get(dataset, tokenizer, cancel=cancel)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, str) for t in dataset):
        return data.from_texts(list(dataset), tokenizer)
    raise UsageError(f"a dataset is a cloche.data.Dataset, a dataset name or path, or a list of"
                     f" strings, not {type(dataset).__name__}")


def _is_token_file(name: str) -> bool:
    from cloche.data.names import parse

    return parse(name)[0].endswith((".npy", ".bin"))


def iterate(ds: Any, batch_size: int, limit: int | None,
            report: Callable[[dict[str, Any]], None] | None,
            totals: dict[str, int], cancel: Any, start: int = 0,
            after: Callable[[Any], None] | None = None) -> Iterator[Any]:
    """Yield batches; report progress events after each; stop with Cancelled between batches.

    ``start``: the first example (a resumed run); ``limit`` still counts from example 0, and
    ``totals`` already holds what the examples before ``start`` contributed. ``after(batch)``
    runs once a batch is done and counted (before its progress event).
    """
    total = len(ds) if limit is None else min(limit, len(ds))
    started = time.monotonic()
    done_before = totals["examples"]
    left = None if limit is None else max(0, limit - start)
    for batch in ds.batches(batch_size, limit=left, start=min(start, len(ds))):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the dataset run was cancelled")
        yield batch
        n = int(batch.tokens.shape[0])
        totals["examples"] += n
        totals["tokens"] += int(batch.attention_mask.sum())
        if after is not None:
            after(batch)
        if report is not None:
            elapsed = time.monotonic() - started
            rate = (totals["examples"] - done_before) / elapsed if elapsed > 0 else 0.0
            eta = (total - totals["examples"]) / rate if rate > 0 else None
            report({"type": "progress", "done": totals["examples"], "total": total,
                    "tokens": totals["tokens"], "elapsed": elapsed, "eta": eta})


class Resumable:
    """Checkpoints and resumption of one dataset run (``checkpoint_every``, ``resume``).

    ``checkpoints`` (``probes.checkpoint.Checkpoints``) keeps, per save context, the pending
    writes of its unfinished run. The run's identity — dataset fingerprint, batch size, limit,
    micro-batches, and how many runs its save context had committed when it started — must
    match for a resume: a checkpoint never lands in another run, nor in a context changed since.
    """

    def __init__(self, checkpoints: Any, req: Any, ds: Any, writes: Any, cancel: Any,
                 aligned: Callable[[int], bool] | None = None) -> None:
        self._store = checkpoints
        self._save = req.save
        self._every = req.checkpoint_every
        self._resume = req.resume
        self._batch_size = req.batch_size
        self._writes = writes
        self._aligned = aligned or (lambda g: True)
        self._since = 0
        self._first = True
        self.active = bool(self._every or self._resume)
        self.identity = ({"dataset": ds.fingerprint(cancel), "batch_size": req.batch_size,
                          "limit": req.limit, "micro_batches": req.micro_batches,
                          "base_runs": writes.run_index} if self.active else {})

    def start(self, totals: dict[str, int]) -> int:
        """The first example to run (0, or after the last checkpoint when resuming)."""
        from cloche.probes.checkpoint import Checkpoint

        if not self._resume:
            return 0
        ckpt: Checkpoint | None = self._store.read(self._save)
        if ckpt is None:
            return 0
        if ckpt.identity != self.identity:
            differ = sorted(k for k in self.identity
                            if ckpt.identity.get(k) != self.identity[k])
            why = ("its save context committed other runs since"
                   if differ == ["base_runs"] else f"its {', '.join(differ)} differ")
            raise UsageError(f"save context {self._save!r} has a checkpoint of another run"
                             f" ({why}): call without resume=True to start over")
        ckpt.restore(self._writes)
        totals.update(ckpt.totals)
        self._first = False
        return ckpt.next_example

    def after_batch(self, next_example: int, totals: dict[str, int], last: bool) -> None:
        """Checkpoint after every ``checkpoint_every`` batches (at an aligned batch)."""
        from cloche.probes.checkpoint import Checkpoint

        if not self._every or last:
            return
        self._since += 1
        g = -(-next_example // self._batch_size)  # batches of the run done so far
        if self._since >= self._every and self._aligned(g):
            self._store.write(self._save, Checkpoint.of(self._writes, self.identity,
                                                        next_example, totals),
                              first=self._first)
            self._first = False
            self._since = 0

    def finished(self) -> None:
        """The run committed: its checkpoint is spent."""
        if self.active:
            self._store.drop(self._save)


def open_export(req: Any, ds: Any) -> Any:
    """The run's ``runtime.export.Exporter`` (None without ``export=``)."""
    if req.export is None:
        return None
    from cloche.runtime.export import Exporter

    return Exporter(req.export, req.export_points, req.export_dtype, req.export_shard_tokens,
                    ds, req.batch_size, req.limit, req.micro_batches)


def with_export_probes(plan: Any, exporter: Any) -> Any:
    """``plan`` plus the exporter's probes, after the run's own at each point."""
    from cloche.runtime.hooks import ProbePlan

    forward = {name: list(fns) for name, fns in plan.forward.items()}
    for point, probe in exporter.probes().items():
        forward.setdefault(point, []).append(probe)
    return ProbePlan(forward, plan.backward)
