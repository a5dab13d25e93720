"""Load a Hugging Face transformers model from a local directory (never from a hub).

The model class is chosen from the config: causal LMs load with ``AutoModelForCausalLM``,
encoder-only families with ``AutoModelForMaskedLM``, anything else with ``AutoModel``. Real
``from_pretrained`` code runs, so whatever loads in plain transformers loads in cloche.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cloche.errors import UsageError

_MASKED_LM_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2")


@dataclass
class Loaded:
    """A loaded model, its tokenizer (or None) and the directory it came from."""

    hf_model: nn.Module
    tokenizer: Any
    path: Path


def auto_class(config: Any) -> Any:
    import transformers

    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return transformers.AutoModelForCausalLM
    if config.model_type in _MASKED_LM_TYPES:
        return transformers.AutoModelForMaskedLM
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return transformers.AutoModelForMaskedLM
    try:
        transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return transformers.AutoModel
    return transformers.AutoModelForCausalLM


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return "auto"
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype):
        raise UsageError(f"unknown dtype {dtype!r} (use e.g. 'float32', 'bfloat16', 'auto')")
    return value


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """No per-tensor progress bar from transformers while loading (restored afterwards)."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def load_hf(
    path: str | os.PathLike[str],
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    attn_implementation: str | None = None,
) -> Loaded:
    """Load the model (eval mode, on ``device``) and its tokenizer from ``path``."""
    import transformers

    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"{str(directory)!r} is not a model directory (no config.json); cloche loads models"
            " from local directories saved with save_pretrained"
        )
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": parse_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    with _quiet_progress():
        hf_model = auto_class(config).from_pretrained(directory, **kwargs)
    hf_model.to(device)
    hf_model.eval()
    tokenizer = None
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    if any((directory / f).is_file() for f in tokenizer_files):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return Loaded(hf_model, tokenizer, directory)
