"""Load a Hugging Face transformers model from a local directory.

A hub name is first turned into a directory of the Hugging Face cache by
:func:`cloche.model.hub.resolve_model`; this module only ever reads local files.

The model class is the one the checkpoint was saved as (``config.architectures``, e.g.
``BertModel`` or ``LlamaForCausalLM``), so a checkpoint without a language-model head loads
without one rather than with a randomly initialised head. Only a config that names no class (or
one transformers lacks) falls back to the family's usual class. Weights the checkpoint does not
hold are never invented: a load that reports missing weights fails with a :class:`UsageError`
naming them. Real ``from_pretrained`` code runs, so whatever loads in plain transformers loads
in cloche.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from cloche.errors import UsageError

_MASKED_LM_TYPES = ("bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2")


@dataclass
class Loaded:
    """A loaded model, its tokenizer (or None) and the directory it came from.

    ``lm_head`` is False for a base model saved without its head (see :func:`has_lm_head`).
    """

    hf_model: nn.Module
    tokenizer: Any
    path: Path
    lm_head: bool = True


def model_class(config: Any) -> Any:
    """The class the checkpoint was saved as (``config.architectures[0]``), else the family's
    usual class (:func:`auto_class`)."""
    import transformers

    for name in list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return auto_class(config)


def model_from_config(config: Any, dtype: torch.dtype) -> nn.Module:
    """A freshly initialised model of :func:`model_class` (under ``torch.device("meta")``: a
    skeleton without memory, as a sharded rank builds before it loads its part)."""
    cls = model_class(config)
    if hasattr(cls, "_from_config"):  # a concrete class (the Auto classes: from_config)
        return cast(nn.Module, cls._from_config(config, dtype=dtype))
    return cast(nn.Module, cls.from_config(config, dtype=dtype))


def has_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` maps hidden states to vocabulary logits (an LM head, or a shard's
    stand-in for one); a base model such as ``BertModel`` or ``LlamaModel`` has none."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is not None


def auto_class(config: Any) -> Any:
    """The family's usual class for a config that does not name one."""
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
def _quiet_load_report() -> Iterator[None]:
    """No load report on transformers' logger: cloche raises on missing weights itself, and
    unexpected ones (a pooler or a pre-training head the class does not use) are harmless."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


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
    """Load the model (eval mode, on ``device``) and its tokenizer from the directory ``path``
    (a hub name is resolved to one first: :func:`cloche.model.hub.resolve_model`)."""
    import transformers

    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise UsageError(
            f"{str(directory)!r} is not a model directory (no config.json); cloche loads models"
            " from directories saved with save_pretrained, or hub names such as 'org/name'"
        )
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True, "dtype": parse_dtype(dtype),
                              "output_loading_info": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    cls = model_class(config)
    with _quiet_progress(), _quiet_load_report():
        hf_model, info = cls.from_pretrained(directory, **kwargs)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:6]) + (f", … ({len(missing) - 6} more)" if len(missing) > 6
                                          else "")
        raise UsageError(
            f"{str(directory)!r} loaded as {cls.__name__} lacks {len(missing)} weight(s) that"
            f" would be randomly initialised: {shown}. cloche never invents weights; if the"
            f" checkpoint was saved as another class, set config.json's \"architectures\" to"
            f" it (saved as {list(getattr(config, 'architectures', None) or [])})")
    hf_model.to(device)
    hf_model.eval()
    tokenizer = None
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    if any((directory / f).is_file() for f in tokenizer_files):
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return Loaded(hf_model, tokenizer, directory, lm_head=has_lm_head(hf_model))
