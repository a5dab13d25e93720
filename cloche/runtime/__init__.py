"""Executing one request on one rank: attach probes, run forward/backward, always detach."""

from cloche.runtime.model import GenerateResult, Model, Outputs, RunResult

__all__ = ["GenerateResult", "Model", "Outputs", "RunResult"]
