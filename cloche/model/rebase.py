"""Adapter paths for a base model that was saved without its head (``BertModel``, ``LlamaModel``).

Adapter tables name modules as they sit in the head class (``bert.encoder.layer``,
``model.layers``): there the base model is an attribute called ``base_model_prefix``. A
checkpoint saved as the base model itself has the same modules one level up (``encoder.layer``,
``layers``). :func:`adapter_for_model` gives such a model its family's adapter with the
model-root paths rebased (the prefix dropped); block-relative sites are unchanged. Paths of the
head (``lm_head``, ``cls.predictions.decoder``) then name no module, so the model has no
``logits`` point and no ``unembed.W_U`` weight instead of an invented one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from cloche.model.families import Adapter, adapter_for

__all__ = ["adapter_for_model", "rebase_adapter"]

#: the adapter fields that hold paths from the model root (the rest are relative to a block)
_ROOT_PATHS = ("layers", "embed", "final_norm", "unembed", "logits")
_ROOT_WEIGHTS = ("global_weights",)


def _strip(path: Any, prefix: str) -> Any:
    if isinstance(path, str) and path.startswith(prefix):
        return path[len(prefix):]
    return path


def rebase_adapter(adapter: Adapter, prefix: str) -> Adapter:
    """``adapter`` with ``prefix + "."`` dropped from every model-root path."""
    head = prefix + "."
    changes: dict[str, Any] = {}
    for name in _ROOT_PATHS:
        if hasattr(adapter, name):
            changes[name] = _strip(getattr(adapter, name), head)
    for name in _ROOT_WEIGHTS:
        rules = getattr(adapter, name, None)
        if isinstance(rules, dict):
            changes[name] = {key: dataclasses.replace(rule, param=_strip(rule.param, head))
                             for key, rule in rules.items()}
    return dataclasses.replace(adapter, **changes)


def adapter_for_model(model: nn.Module) -> Adapter | None:
    """The adapter of ``model``'s family, with paths that name ``model``'s own modules.

    A head class (``LlamaForCausalLM``) gets its adapter as it is; a base model
    (``LlamaModel``, whose modules lack the ``model.`` prefix) gets it rebased.
    """
    adapter = adapter_for(getattr(getattr(model, "config", None), "model_type", None))
    if adapter is None:
        return None
    modules = {name for name, _ in model.named_modules()}
    if adapter.layers in modules:
        return adapter
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and adapter.layers.startswith(prefix + ".") \
            and adapter.layers[len(prefix) + 1:] in modules:
        return rebase_adapter(adapter, prefix)
    return adapter
