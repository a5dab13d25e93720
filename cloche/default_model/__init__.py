"""The embedded default model: a small Llama-style causal LM trained on Python's stdlib.

``cloche.load()`` with no model named loads :func:`weights_dir`. The directory is plain
Hugging Face format (``config.json``, ``model.safetensors``, ``tokenizer.json``), so
``transformers.AutoModelForCausalLM.from_pretrained(weights_dir())`` works without cloche.
Training (the recipe that made the shipped weights): ``python -m cloche.default_model.recipe``;
figures: ``python -m cloche.default_model.evaluate``; model card: ``docs/default-model.md``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["weights_dir"]


def weights_dir() -> Path:
    """The shipped model's directory (weights, config and tokenizer files)."""
    return Path(__file__).resolve().parent / "cloche-default"  # the folder names the model
