"""Architecture families: one small adapter table per family (or group of close relatives).

Each module holds the :class:`Adapter` records of one family; :data:`ADAPTERS` lists them all
and :func:`adapter_for` finds the one for a Hugging Face ``config.model_type``. A family that
has no adapter still loads and still offers every module's input and output as a probe point.
"""

from __future__ import annotations

from cloche.model.families.base import Adapter, Site, WeightRule
from cloche.model.families.bert import BERT, ROBERTA
from cloche.model.families.bloom import BLOOM
from cloche.model.families.cohere import COHERE
from cloche.model.families.falcon import FALCON
from cloche.model.families.gemma import GEMMA, GEMMA2, GEMMA3
from cloche.model.families.gpt2 import GPT2
from cloche.model.families.gpt_neo import GPT_NEO
from cloche.model.families.gpt_neox import GPT_NEOX
from cloche.model.families.gptj import GPTJ
from cloche.model.families.llama import LLAMA, QWEN3
from cloche.model.families.moe import MIXTRAL, QWEN2_MOE, QWEN3_MOE
from cloche.model.families.olmo import OLMO, OLMO2, OLMOE
from cloche.model.families.opt import OPT
from cloche.model.families.phi import PHI
from cloche.model.families.phi3 import PHI3
from cloche.model.families.stablelm import STABLELM
from cloche.model.families.starcoder2 import STARCODER2

__all__ = ["ADAPTERS", "Adapter", "Site", "WeightRule", "adapter_for"]

ADAPTERS: tuple[Adapter, ...] = (
    GPT2, LLAMA, GPT_NEOX, BERT, OPT, GPTJ, GPT_NEO, PHI, GEMMA, GEMMA2, GEMMA3, QWEN3, PHI3,
    OLMO2, STABLELM, STARCODER2, ROBERTA, MIXTRAL, QWEN2_MOE, FALCON, BLOOM, OLMO, OLMOE,
    QWEN3_MOE, COHERE,
)

_BY_TYPE = {model_type: adapter for adapter in ADAPTERS for model_type in adapter.model_types}
if len(_BY_TYPE) != sum(len(a.model_types) for a in ADAPTERS):  # pragma: no cover - a table bug
    raise RuntimeError("two adapters claim the same model_type")


def adapter_for(model_type: str | None) -> Adapter | None:
    """The adapter for a Hugging Face ``config.model_type``, or None for an unknown family."""
    return _BY_TYPE.get(model_type) if model_type is not None else None
