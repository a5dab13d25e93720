"""Serving one model sharded by layers over many processes, GPUs and machines.

``start_local`` / ``serve_distributed`` start the ranks on this machine; ``cloche serve
--torchrun`` (or ``python -m cloche.sharding.worker --serve module:function``) is the entry point
under ``torchrun``. Rank 0's :class:`ShardedExecutor` is an executor of the model API, so
:class:`cloche.Model`, the server and every client feature work unchanged against it.
See ``docs/distributed.md``.
"""

from cloche.sharding.layout import DistConfig
from cloche.sharding.plan import ShardPlan, balanced_plan, plan_from_counts

__all__ = [
    "DistConfig",
    "ShardPlan",
    "ShardedExecutor",
    "balanced_plan",
    "plan_from_counts",
    "serve_distributed",
    "start_local",
]


def __getattr__(name: str):  # the heavy parts load on first use
    if name == "ShardedExecutor":
        from cloche.sharding.executor import ShardedExecutor

        return ShardedExecutor
    if name in ("serve_distributed", "start_local"):
        from cloche.sharding import launch

        return getattr(launch, name)
    raise AttributeError(name)
