"""The request records: everything a model can be asked to do, as plain data.

The facade (:class:`cloche.Model`) validates what the user passed and builds one of these; an
executor — local, sharded or remote — carries it out. The same records cross the wire to a
server and the control plane to other ranks, so adding an argument to ``run`` means adding a
field to :class:`Run` and reading it where it is executed: nothing else copies the signature.

Each record names its output type (``Request[T]``) so that ``executor.execute(Run(...))`` is
typed as :class:`RunOutput`. ``heavy`` records are model work (queued fairly on a server,
cancellable); light ones read committed state and are answered at once.

Probe plans (``forward``/``backward_probes``) map *canonical* point names to lists of probe
functions: the facade has resolved aliases and checked that every probe is callable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch

from cloche.model.info import ModelInfo
from cloche.model.points import ProbePoint

__all__ = [
    "CONTEXT_ACTIONS",
    "Call",
    "Config",
    "Context",
    "ContextAction",
    "Describe",
    "Generate",
    "ListContexts",
    "ModelInfo",
    "Owner",
    "Param",
    "ParamNames",
    "Ping",
    "ProbePlanSpec",
    "ProbePoints",
    "Request",
    "Run",
    "RunDataset",
    "RunOutput",
    "TokenizerFiles",
]

#: what executing a request returns; covariant: a ``Request[list[str]]`` is a
#: ``Request[Sequence[str]]`` (the output is only ever produced, never consumed)
T_co = TypeVar("T_co", covariant=True)

#: canonical point name -> probe functions, applied in order
ProbePlanSpec = dict[str, list[Callable[..., Any]]]

ContextAction = Literal["keys", "fetch", "state", "num_runs", "reducers", "result", "nbytes",
                        "clear", "persist", "restore"]
CONTEXT_ACTIONS: tuple[str, ...] = ("keys", "fetch", "state", "num_runs", "reducers", "result",
                                    "nbytes", "clear", "persist", "restore")
#: actions that change a save context: queued behind running work, never answered beside it
_WRITING_ACTIONS = ("clear", "persist", "restore")


class Request(Generic[T_co]):
    """Base of every request record; ``T_co`` is what executing it returns."""

    heavy: ClassVar[bool] = False

    @property
    def is_heavy(self) -> bool:
        return self.heavy


# --------------------------------------------------------------------------- outputs


@dataclass(frozen=True, kw_only=True)
class RunOutput:
    """What executing :class:`Run` returns; the facade turns it into a ``RunResult``."""

    logits: torch.Tensor | None
    loss: float | None


# --------------------------------------------------------------------------- heavy requests


@dataclass(frozen=True, kw_only=True)
class Run(Request[RunOutput]):
    """One forward pass (and optionally a backward pass) with probes attached.

    ``backward``: ``None`` (no backward), ``True`` (mean next-token loss) or a callable that
    receives :class:`~cloche.api.results.Outputs` and returns the scalar to backprop.
    ``micro_batches`` > 1 splits a forward-only batch (probes then run once per micro-batch).
    """

    heavy: ClassVar[bool] = True
    ids: torch.Tensor
    mask: torch.Tensor
    forward: ProbePlanSpec = field(default_factory=dict)
    backward_probes: ProbePlanSpec = field(default_factory=dict)
    save: str = "default"
    backward: Any = None
    return_logits: bool = True
    micro_batches: int = 1


@dataclass(frozen=True, kw_only=True)
class Generate(Request[torch.Tensor]):
    """Continue ``ids`` with Hugging Face ``generate`` (``options``), probes active at every step.

    Returns the token ids, prompt included, ``(batch, prompt + new)``.
    """

    heavy: ClassVar[bool] = True
    ids: torch.Tensor
    mask: torch.Tensor
    forward: ProbePlanSpec = field(default_factory=dict)
    save: str = "default"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class RunDataset(Request[dict[str, Any]]):
    """Every example of ``dataset`` (or the first ``limit``) through the model, as one transaction.

    ``dataset`` is a ``cloche.data.Dataset``, a dataset name or a list of texts; names and texts
    are resolved where the model runs (with its tokenizer). Returns the totals plus the save
    context's reduced results and state: ``{"examples", "tokens", "dataset", "fingerprint",
    "reducers", "state"}``. Progress is reported as ``{"type": "progress", ...}`` events.
    """

    heavy: ClassVar[bool] = True
    dataset: Any
    forward: ProbePlanSpec = field(default_factory=dict)
    save: str = "default"
    batch_size: int = 8
    limit: int | None = None
    micro_batches: int = 1


@dataclass(frozen=True, kw_only=True)
class Call(Request[Any]):
    """``fn(model, *args, **kwargs)`` next to the model.

    ``rank=None`` runs it with the whole model (a :class:`cloche.Model`); ``rank=k`` on rank
    ``k`` with that rank's shard; ``rank="all"`` on every rank (returns ``{rank: result}``).
    A model that is not sharded has one rank, 0.
    """

    heavy: ClassVar[bool] = True
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    rank: int | str | None = None


@dataclass(frozen=True, kw_only=True)
class Context(Request[Any]):
    """One action on the save context ``name`` (``args`` as the handle method takes them).

    Reads (keys, fetch, state, ...) are light; ``clear``/``persist``/``restore`` are queued.
    """

    name: str
    action: str
    args: tuple[Any, ...] = ()

    @property
    def is_heavy(self) -> bool:
        return self.action in _WRITING_ACTIONS


# --------------------------------------------------------------------------- light requests


@dataclass(frozen=True, kw_only=True)
class Describe(Request[ModelInfo]):
    """The model's :class:`ModelInfo`."""


@dataclass(frozen=True, kw_only=True)
class ProbePoints(Request[list[ProbePoint]]):
    """Every probe point with its (symbolic) shape, canonical points first."""


@dataclass(frozen=True, kw_only=True)
class Owner(Request[int]):
    """The rank whose probes run at canonical point ``point`` (0 unless sharded)."""

    point: str


@dataclass(frozen=True, kw_only=True)
class Param(Request[torch.Tensor]):
    """A weight, or its gradient after a backward run, by canonical or raw name."""

    name: str
    grad: bool = False


@dataclass(frozen=True, kw_only=True)
class ParamNames(Request[list[str]]):
    """Weight names: canonical ones (that exist) first, then every raw parameter name."""

    canonical: bool = True


@dataclass(frozen=True, kw_only=True)
class ListContexts(Request[list[str]]):
    """The names of the save contexts that hold something."""


@dataclass(frozen=True, kw_only=True)
class Config(Request[dict[str, Any]]):
    """The Hugging Face config as a dict (``config.to_dict()``)."""


@dataclass(frozen=True, kw_only=True)
class TokenizerFiles(Request["dict[str, bytes] | None"]):
    """The tokenizer as the files ``save_pretrained`` writes (None without a tokenizer)."""


@dataclass(frozen=True, kw_only=True)
class Ping(Request[Any]):
    """A round trip; returns ``value``."""

    value: Any = None
