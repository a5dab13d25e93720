"""Executing requests on a model held by this process: attach probes, run, always detach."""

from cloche.runtime.executor import LocalExecutor

__all__ = ["LocalExecutor"]
