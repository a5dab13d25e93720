"""The decode steps of a sharded generation, as rank 0 drives them and the other ranks follow.

Only rank 0 runs Hugging Face's ``generate`` loop (logits processing, sampling, stopping
criteria). Each step it calls its shard's ``forward()``; a forward pre-hook
(:class:`StepRecorder`) writes that call's keyword arguments down as a :class:`Step`, which
travels with the hidden state to the next rank. A following rank rebuilds the same call
(:meth:`Follower.kwargs`) and runs its own shard's ``forward()`` with its own KV cache, so only
one new token's hidden state crosses each hop per step, and the prefix is never recomputed.

A KV cache is the one argument that cannot travel: each rank keeps its own. When rank 0's
``generate`` hands its forward a cache that has seen no token yet, the step carries an empty
copy of it (so a follower's cache has the same class and per-layer configuration); later steps
say only "the cache you returned last step". Decoding that rearranges a cache between steps
(beam search reorders it) would need that step sent too; the generate options a request may
carry (``cloche.api.requests``) do not include it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Follower", "Step", "StepRecorder"]


def _is_cache(value: Any) -> bool:
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _empty(cache: Any) -> bool:
    try:
        return int(cache.get_seq_length()) == 0
    except (AttributeError, TypeError, ValueError):  # a cache that cannot say: not a new one
        return False


@dataclass
class Step:
    """One forward call of rank 0's decode loop, in a form that pickles (tensors on the CPU)."""

    kwargs: dict[str, Any]
    cache_arg: str | None = None  # the keyword under which the forward receives its cache
    fresh_cache: Any = None  # an empty copy of a cache new at this step, else None


@dataclass
class StepRecorder:
    """Rank 0's forward pre-hook: records each decode step's arguments as a :class:`Step`."""

    step: Step | None = None
    _seen: set[int] = field(default_factory=set)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        step = Step({})
        for name, value in kwargs.items():
            if _is_cache(value):
                step.cache_arg = name
                if id(value) not in self._seen and _empty(value):
                    step.fresh_cache = copy.deepcopy(value)
                self._seen.add(id(value))
            elif isinstance(value, torch.Tensor):
                step.kwargs[name] = value.detach().cpu()
            else:
                step.kwargs[name] = value
        self.step = step


class Follower:
    """A following rank's side: rebuilds each step's call with this rank's own cache."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cache: Any = None

    def kwargs(self, step: Step) -> dict[str, Any]:
        """The keyword arguments for this rank's ``forward()`` at ``step``."""
        out = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
               for k, v in step.kwargs.items()}
        if step.fresh_cache is not None:
            # a copy: the step travels on (to the next rank) as it came
            self.cache = copy.deepcopy(step.fresh_cache)
        if step.cache_arg is not None:
            out[step.cache_arg] = self.cache
        return out

    def returned(self, output: Any) -> None:
        """Keep the cache this rank's forward returned (models that build one themselves)."""
        if not hasattr(output, "get"):
            return
        for name in ("cache", "past_key_values"):  # the field's name since / before 5.x
            cache = output.get(name)
            if cache is not None and _is_cache(cache):
                self.cache = cache
                return
