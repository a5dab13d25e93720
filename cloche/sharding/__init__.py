"""Serving one model sharded by layers over many processes, GPUs and machines.

``start_local`` / ``serve_distributed`` start the ranks on this machine; ``python -m
cloche.sharding.worker`` is the entry point under ``torchrun``. Rank 0's :class:`DistributedModel`
has the Model API, so the server (and every client feature) works unchanged against it.
See ``docs/distributed.md``.
"""

from cloche.sharding.layout import DistConfig
from cloche.sharding.plan import ShardPlan, balanced_plan, plan_from_counts

__all__ = ["DistConfig", "DistributedModel", "ShardPlan", "balanced_plan", "plan_from_counts",
           "serve_distributed", "start_local"]


def __getattr__(name: str):  # the heavy parts load on first use
    if name == "DistributedModel":
        from cloche.sharding.model import DistributedModel

        return DistributedModel
    if name in ("serve_distributed", "start_local"):
        from cloche.sharding import launch

        return getattr(launch, name)
    raise AttributeError(name)
