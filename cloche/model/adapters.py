"""Kept for existing imports: the adapter records now live in :mod:`cloche.model.families`."""

from cloche.model.families import ADAPTERS, Adapter, Site, WeightRule, adapter_for

__all__ = ["ADAPTERS", "Adapter", "Site", "WeightRule", "adapter_for"]
