"""``cloche.load``: the front door for a model in this process."""

from __future__ import annotations

import os

import torch

from cloche.api.model import Model
from cloche.model.hub import resolve_model
from cloche.model.loader import load_hf
from cloche.probes.journal import Journal
from cloche.probes.store import SaveStore
from cloche.runtime.executor import LocalExecutor


def load(path: str | os.PathLike[str] | None = None, *, revision: str | None = None,
         device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         max_saved_bytes: int | None = None,
         state_dir: str | os.PathLike[str] | None = None) -> Model:
    """Load a Hugging Face model: a local directory, a hub name, or the shipped default (None).

    A hub name (``"org/name"``, at ``revision``: a branch, tag or commit) resolves through the
    Hugging Face cache as transformers does: online it downloads what is missing, with
    ``HF_HUB_OFFLINE=1`` it loads from the cache alone (``HF_HOME``/``HF_HUB_CACHE`` say where).
    The model is the class the checkpoint was saved as: a base model saved without its head
    (``BertModel``) loads without one and says so (``info()["lacks"]``).
    ``dtype``: ``None`` (float32), ``"auto"`` (as saved), ``"bfloat16"``, ``torch.float16``, ...
    ``max_saved_bytes`` caps the memory that save contexts may hold (a clear
    ``ResourceLimit`` error instead of running out of memory). ``state_dir`` keeps every
    committed save context on disk, crash-consistently, and loads what is already there.
    """
    if path is None:
        from cloche.default_model import weights_dir

        path = weights_dir()  # its folder is named cloche-default: so is the model, everywhere
    source = resolve_model(path, revision=revision)
    loaded = load_hf(source.path, device=device, dtype=dtype)
    journal = Journal(state_dir) if state_dir is not None else None
    store = SaveStore(max_bytes=max_saved_bytes, journal=journal)
    return Model(LocalExecutor(loaded, store=store, name=source.name))
