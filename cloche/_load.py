"""``cloche.load``: the front door for a model in this process."""

from __future__ import annotations

import os

import torch

from cloche.api.model import Model
from cloche.model.loader import load_hf
from cloche.probes.journal import Journal
from cloche.probes.store import SaveStore
from cloche.runtime.executor import LocalExecutor


def load(path: str | os.PathLike[str] | None = None, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, max_saved_bytes: int | None = None,
         state_dir: str | os.PathLike[str] | None = None) -> Model:
    """Load a Hugging Face model from a local directory (the shipped default when ``None``).

    ``max_saved_bytes`` caps the memory that save contexts may hold (a clear
    ``ResourceLimit`` error instead of running out of memory). ``state_dir`` keeps every
    committed save context on disk, crash-consistently, and loads what is already there.
    """
    name = None
    if path is None:
        from cloche.default_model import weights_dir

        path, name = weights_dir(), "cloche-default"
    loaded = load_hf(path, device=device, dtype=dtype)
    journal = Journal(state_dir) if state_dir is not None else None
    store = SaveStore(max_bytes=max_saved_bytes, journal=journal)
    return Model(LocalExecutor(loaded, store=store, name=name))
