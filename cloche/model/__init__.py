"""Loading Hugging Face models and describing them: adapters, probe points, canonical weights."""

from cloche.model.families import ADAPTERS, Adapter, adapter_for
from cloche.model.hub import ModelSource, resolve_model
from cloche.model.loader import load_hf
from cloche.model.points import ProbePoint
from cloche.model.rebase import adapter_for_model

__all__ = ["ADAPTERS", "Adapter", "ModelSource", "ProbePoint", "adapter_for", "adapter_for_model",
           "load_hf", "resolve_model"]
