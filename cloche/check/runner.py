"""``cloche check``: load a checkpoint twice (cloche and plain transformers), pick inputs, run
the battery, and the sharded comparison when asked."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

import cloche
from cloche.check.battery import battery
from cloche.check.report import SKIP, Report, Row
from cloche.check.sharded import sharded_rows
from cloche.errors import UsageError
from cloche.model import load_hf

__all__ = ["check", "token_inputs"]


def token_inputs(config: Any, *, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """``(batch, seq)`` seeded token ids inside the vocabulary, avoiding the special tokens
    (padding, BOS, EOS), no longer than the model's learned positions."""
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 1:
        raise UsageError("the model's config states no vocab_size: pass --text")
    limit = int(getattr(config, "max_position_embeddings", 0)
                or getattr(config, "n_positions", 0) or 0)
    if limit:
        seq = min(seq, limit)
    allowed = torch.ones(vocab, dtype=torch.bool)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(config, name, None)
        for token in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(token, int) and 0 <= token < vocab:
                allowed[token] = False
    pool = allowed.nonzero().squeeze(1)
    if len(pool) == 0:
        pool = torch.arange(vocab)
    generator = torch.Generator().manual_seed(seed)
    return pool[torch.randint(len(pool), (batch, seq), generator=generator)]


def check(source: str | os.PathLike[str] | None, *, revision: str | None = None,
          world_size: int = 1, dtype: str | None = None, device: str = "cpu",
          text: str | None = None, batch: int = 2, seq: int = 12, seed: int = 0,
          threads: int | None = None,
          progress: Callable[[str], None] | None = None) -> Report:
    """Check a checkpoint (a directory, a hub name, or None for the shipped model) against plain
    transformers and, with ``world_size`` >= 2, sharded over that many ranks of this machine
    against one process. ``progress`` is told the name of each check as it starts."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UsageError(f"world_size ({world_size!r}) must be an int >= 1")
    model = cloche.load(source, revision=revision, dtype=dtype, device=device)
    path = model.executor.path  # type: ignore[attr-defined]  # a local executor's directory
    reference = load_hf(path, dtype=dtype, device=device).hf_model
    if text is not None:
        if model.tokenizer is None:
            raise UsageError(f"{model.name} has no tokenizer: leave out --text (cloche then"
                             " uses seeded token ids)")
        ids = model.tokenize([text])
        inputs = f"the text {text!r} ({ids.shape[1]} tokens)"
    else:
        ids = token_inputs(model.config, batch=batch, seq=seq, seed=seed)
        inputs = f"{ids.shape[0]} seeded sequences of {ids.shape[1]} tokens (seed {seed})"
    ids = ids.to(model.device)
    info = model.info()
    report = Report(model=model.name, details={
        "family": info["family"] or info["model_type"], "n_layers": info["n_layers"],
        "dtype": str(next(reference.parameters()).dtype).removeprefix("torch."),
        "device": str(model.device), "inputs": inputs, "world_size": world_size,
        "missing": info["missing"]})
    try:
        report.rows.extend(battery(model, reference, ids, progress=progress))
    finally:
        del reference
    label = "sharded == single process"
    if world_size == 1:
        report.rows.append(Row(check=label, status=SKIP,
                               reason="run with --world-size N (N >= 2) to check it"))
    elif world_size > info["n_layers"]:
        report.rows.append(Row(check=label, status=SKIP, reason=(
            f"world size {world_size} exceeds the model's {info['n_layers']} layers")))
    else:
        if progress is not None:
            progress(f"starting {world_size} ranks to compare the sharded model")
        from cloche.sharding.launch import start_local

        sharded = start_local(path, world_size, dtype=dtype, threads=threads,
                              device=None if device == "cpu" else device)
        try:
            report.rows.extend(sharded_rows(model, sharded, ids.cpu()))
        finally:
            sharded.close()
    model.close()
    return report
