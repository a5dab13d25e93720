"""Dataset iteration for ``run_dataset``: batches, progress and cancellation between batches."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from cloche.errors import Cancelled, UsageError

__all__ = ["as_dataset", "iterate"]


def as_dataset(dataset: Any, tokenizer: Any) -> Any:
    """A ``cloche.data.Dataset`` from a dataset, a dataset name or path, or a list of strings."""
    from cloche import data

    if isinstance(dataset, data.Dataset):
        return dataset
    if tokenizer is None and isinstance(dataset, (str, list, tuple)):
        # cloche.data would fall back to the default model's tokenizer: ids from another vocabulary
        raise UsageError("this model has no tokenizer: pass a cloche.data.Dataset of token ids"
                         " instead of texts or a dataset name")
    if isinstance(dataset, str):
        return data.get(dataset, tokenizer)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(t, str) for t in dataset):
        return data.from_texts(list(dataset), tokenizer)
    raise UsageError(f"a dataset is a cloche.data.Dataset, a dataset name or path, or a list of"
                     f" strings, not {type(dataset).__name__}")


def iterate(ds: Any, batch_size: int, limit: int | None,
            report: Callable[[dict[str, Any]], None] | None,
            totals: dict[str, int], cancel: Any) -> Iterator[Any]:
    """Yield batches; report progress events after each; stop with Cancelled between batches."""
    total = len(ds) if limit is None else min(limit, len(ds))
    started = time.monotonic()
    for batch in ds.batches(batch_size, limit=limit):
        if cancel is not None and cancel.is_set():
            raise Cancelled("the dataset run was cancelled")
        yield batch
        n = int(batch.tokens.shape[0])
        totals["examples"] += n
        totals["tokens"] += int(batch.attention_mask.sum())
        if report is not None:
            elapsed = time.monotonic() - started
            rate = totals["examples"] / elapsed if elapsed > 0 else 0.0
            eta = (total - totals["examples"]) / rate if rate > 0 else None
            report({"type": "progress", "done": totals["examples"], "total": total,
                    "tokens": totals["tokens"], "elapsed": elapsed, "eta": eta})
