"""Loading Hugging Face models and describing them: adapters, probe points, canonical weights."""

from cloche.model.families import ADAPTERS, Adapter, adapter_for
from cloche.model.loader import load_hf
from cloche.model.points import ProbePoint

__all__ = ["ADAPTERS", "Adapter", "ProbePoint", "adapter_for", "load_hf"]
