"""What ``model.attach_dictionary`` is given, read where the user is, and what it says back.

``dictionary_source`` turns the user's argument — a SAELens folder, a
:class:`~cloche.dictionaries.SparseDictionary`, a dict of tensors, or a folder on the server —
into the config and weights the attach request carries. ``convention_notes`` compares the
conventions the dictionary was trained with (``prepend_bos``, ``context_size``) with the
model's, so that a mismatch, which changes every feature silently, is said out loud.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from cloche.dictionaries.format import DictionaryConfig, load_folder, weights_from
from cloche.dictionaries.modules import SparseDictionary
from cloche.errors import UsageError

__all__ = ["convention_notes", "dictionary_source"]


def dictionary_source(source: Any, point: str | None, architecture: str | None, k: int | None,
                      on_server: bool
                      ) -> tuple[DictionaryConfig | None, dict[str, torch.Tensor] | None,
                                 str | None]:
    """``attach_dictionary``'s source as (config, weights, server-side folder)."""
    if on_server:
        if not isinstance(source, (str, os.PathLike)):
            raise UsageError(f"on_server=True needs a folder path, not {type(source).__name__}")
        return None, None, os.fspath(source)
    if isinstance(source, (str, os.PathLike)):
        config, weights = load_folder(source)
        return config, weights, None
    if isinstance(source, SparseDictionary):
        return source.config, source.weights(), None
    if isinstance(source, Mapping):
        w_enc = source.get("W_enc")
        if not isinstance(w_enc, torch.Tensor) or w_enc.dim() != 2:
            raise UsageError("dictionary weights need 'W_enc', a (d_in, d_sae) tensor")
        if architecture is None:
            architecture = ("jumprelu" if "threshold" in source or "log_threshold" in source
                            else "topk" if k is not None else "standard")
        config = DictionaryConfig(d_in=int(w_enc.shape[0]), d_sae=int(w_enc.shape[1]),
                                  architecture=architecture, k=k, hook_name=point)
        return config, weights_from(source, config), None
    raise UsageError("a dictionary is a SAELens folder, a SparseDictionary or a dict of"
                     f" tensors, not {type(source).__name__}")


def convention_notes(summary: Mapping[str, Any], tokenizer: Any, prepend_bos: bool | None,
                     max_positions: int) -> list[str]:
    """Where the dictionary's training conventions and the model's differ."""
    notes = []
    name = summary.get("name")
    wanted = summary.get("prepend_bos")
    if wanted is not None and tokenizer is not None:
        bos = getattr(tokenizer, "bos_token_id", None)
        if prepend_bos is not None:
            adds = prepend_bos and bos is not None
        else:
            ids = tokenizer("a")["input_ids"]
            adds = bos is not None and bool(ids) and ids[0] == bos
        if bool(wanted) != adds:
            notes.append(
                f"dictionary {name!r} was trained with prepend_bos={bool(wanted)}, but this"
                f" model's texts {'get' if adds else 'get no'} BOS token: set"
                f" model.prepend_bos = {bool(wanted)} (or attach with apply_conventions=True)"
                " for the activations it expects")
    context = summary.get("context_size")
    if isinstance(context, int) and max_positions and context < max_positions:
        notes.append(f"dictionary {name!r} was trained on contexts of {context} tokens; this"
                     f" model takes {max_positions}: features at later positions are outside"
                     " what it was trained on")
    return notes
