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

A server cannot trust that its peer used the facade, so every record also checks itself:
``check(model)`` raises :class:`~cloche.errors.UsageError` naming the first field whose type or
value cannot be executed (against the served model's :class:`ModelInfo` when given: token ids
in the vocabulary, probe points that exist, ranks that exist). The server calls it before
dispatching; a wrong request is then an error that says what is wrong, not a ``TypeError``
from deep inside the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, NoReturn, TypeVar

import numpy as np
import torch

from cloche.errors import UnknownProbePoint, UsageError
from cloche.model.info import ModelInfo
from cloche.model.points import ProbePoint

__all__ = [
    "CONTEXT_ACTIONS",
    "DERIVED_PREFIX",
    "AttachDictionary",
    "Call",
    "Config",
    "Context",
    "ContextAction",
    "Describe",
    "DetachDictionary",
    "Dictionaries",
    "Generate",
    "ListContexts",
    "ModelInfo",
    "Owner",
    "Param",
    "ParamNames",
    "Ping",
    "ProbePlanSpec",
    "ProbePoints",
    "Quota",
    "Request",
    "Run",
    "RunDataset",
    "RunOutput",
    "ServerStatus",
    "TokenizerFiles",
]

#: what executing a request returns; covariant: a ``Request[list[str]]`` is a
#: ``Request[Sequence[str]]`` (the output is only ever produced, never consumed)
T_co = TypeVar("T_co", covariant=True)

#: canonical point name -> probe functions, applied in order
ProbePlanSpec = dict[str, list[Callable[..., Any]]]

ContextAction = Literal["keys", "fetch", "fetch_many", "state", "num_runs", "reducers", "result",
                        "nbytes", "clear", "persist", "restore"]
CONTEXT_ACTIONS: tuple[str, ...] = ("keys", "fetch", "fetch_many", "state", "num_runs", "reducers",
                                    "result", "nbytes", "clear", "persist", "restore")
#: actions that change a save context: queued behind running work, never answered beside it
_WRITING_ACTIONS = ("clear", "persist", "restore")
#: how many arguments each save-context action takes (as the handle passes them)
_ACTION_ARITY = {"keys": 0, "fetch": 3, "fetch_many": 2, "state": 0, "num_runs": 0, "reducers": 0,
                 "result": 1, "nbytes": 0, "clear": 0, "persist": 1, "restore": 1}
_FETCH_MODES = ("stack", "cat", "list")
#: how the names of points derived by an attached dictionary begin (``dict:res3:features``)
DERIVED_PREFIX = "dict:"
_ID_DTYPES = (torch.int64, torch.int32)
#: up to this many token ids (or mask values), checks go through Python lists, not tensor ops
_FEW = 256
_MASK_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
                torch.float32, torch.float64, torch.float16, torch.bfloat16)


class Request(Generic[T_co]):
    """Base of every request record; ``T_co`` is what executing it returns."""

    heavy: ClassVar[bool] = False

    @property
    def is_heavy(self) -> bool:
        return self.heavy

    def check(self, model: ModelInfo | None = None) -> None:
        """Raise :class:`UsageError` naming the first field that cannot be executed.

        ``model`` (the served model's description) enables the checks that depend on it.
        """


# --------------------------------------------------------------------------- field checks


def _fail(record: object, name: str, must: str, value: Any, error: type = UsageError) -> NoReturn:
    raise error(f"{type(record).__name__}.{name} {must}, not {_show(value)}")


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"a numpy array of shape {value.shape}"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, (float, np.floating))) and math.isfinite(value)


def _int_field(record: object, name: str, *, low: int, high: int | None = None,
               optional: bool = False) -> None:
    value = getattr(record, name)
    if optional and value is None:
        return
    if not _is_int(value) or value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        _fail(record, name, f"must be {'None or ' if optional else ''}an int {bound}", value)


def _bool_field(record: object, name: str) -> None:
    if not isinstance(getattr(record, name), bool):
        _fail(record, name, "must be a bool", getattr(record, name))


def _name_field(record: object, name: str) -> None:
    value = getattr(record, name)
    if not isinstance(value, str) or not value:
        _fail(record, name, "must be a non-empty string", value)


def _tokens(record: Any, model: ModelInfo | None) -> None:
    """``ids``: (batch, seq) int64/int32 ids in the vocabulary; ``mask``: 0/1, same shape."""
    ids, mask = record.ids, record.mask
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in _ID_DTYPES:
        _fail(record, "ids", "must be a 2-D int64 tensor of token ids (batch, seq)", ids)
    if ids.numel() == 0:
        _fail(record, "ids", "must hold at least one token", ids)
    if ids.numel() <= _FEW:  # a few values: Python is faster than three tensor ops
        values = ids.reshape(-1).tolist()
        low, high = min(values), max(values)
    else:
        low, high = int(ids.min()), int(ids.max())
    if low < 0 or (model is not None and model.d_vocab > 0 and high >= model.d_vocab):
        vocab = f" [0, {model.d_vocab})" if model is not None and model.d_vocab else ""
        _fail(record, "ids", f"must be token ids in the vocabulary{vocab}",
              f"ids from {low} to {high}")
    if model is not None and model.max_positions and ids.shape[1] > model.max_positions:
        _fail(record, "ids", f"must be at most {model.max_positions} tokens long (the model's"
                             " position embeddings)", ids)
    if (not isinstance(mask, torch.Tensor) or mask.dtype not in _MASK_DTYPES
            or mask.shape != ids.shape):
        _fail(record, "mask", f"must be a 0/1 tensor of the shape of ids {tuple(ids.shape)}",
              mask)
    if mask.numel() <= _FEW:
        binary = set(mask.reshape(-1).tolist()) <= {0, 1}  # True == 1, 0.0 == 0; NaN is neither
    else:
        binary = bool(((mask == 0) | (mask == 1)).all())
    if not binary:
        _fail(record, "mask", "must hold only 0 and 1", mask)


_last_points: tuple[tuple[str, ...], frozenset[str]] = ((), frozenset())


def _point_set(names: tuple[str, ...]) -> frozenset[str]:
    """``frozenset(names)``, kept for the last tuple seen: a server checks every request
    against the same description (hundreds of names)."""
    global _last_points
    seen, points = _last_points
    if seen is not names:
        points = frozenset(names)
        if type(names) is tuple:  # (a list could change in place)
            _last_points = (names, points)
    return points


def _plan(record: object, name: str, model: ModelInfo | None) -> None:
    """A probe plan: canonical point name -> list of callables."""
    plan = getattr(record, name)
    if not isinstance(plan, dict):
        _fail(record, name, "must map probe point names to lists of functions", plan)
    if not plan:
        return
    points = _point_set(model.point_names) if model is not None else frozenset()
    for point, fns in plan.items():
        if not isinstance(point, str):
            _fail(record, name, "must map probe point names (strings) to functions", point)
        # a derived point (dict:<name>:<part>) is checked where its dictionary is attached
        if points and point not in points and not point.startswith(DERIVED_PREFIX):
            _fail(record, name, "must name probe points of the model (canonical names)", point,
                  UnknownProbePoint)
        if not isinstance(fns, (list, tuple)) or not all(callable(fn) for fn in fns):
            _fail(record, f"{name}[{point!r}]", "must be a list of functions", fns)


def _generate_options(record: Any, model: ModelInfo | None) -> None:
    options = record.options
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        _fail(record, "options", "must map generate option names to values", options)
    unknown = sorted(set(options) - set(_OPTION_RULES))
    if unknown:
        _fail(record, "options", f"may only hold {', '.join(_OPTION_RULES)}", unknown)
    vocab = model.d_vocab if model is not None else 0
    for key, value in options.items():
        must, ok = _OPTION_RULES[key]
        if not ok(value):
            _fail(record, f"options[{key!r}]", f"must be {must}", value)
        if key == "pad_token_id" and vocab and record.ids.shape[0] > 1 and value >= vocab:
            # a batch pads finished rows with it, and feeds it back to the model
            _fail(record, "options['pad_token_id']", f"must be in [0, {vocab}) for a batch",
                  value)
    new = options.get("max_new_tokens", 0)
    limit = model.max_positions if model is not None else 0
    if limit and record.ids.shape[1] + new > limit:
        _fail(record, "options['max_new_tokens']", f"must keep prompt + new tokens within"
              f" {limit} (the model's position embeddings)", new)


#: Hugging Face ``generate`` options a request may carry: (what each must be, its test)
_OPTION_RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "max_new_tokens": ("an int >= 1", lambda v: _is_int(v) and v >= 1),
    "min_new_tokens": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
    "do_sample": ("a bool", lambda v: isinstance(v, bool)),
    "temperature": ("a number > 0", lambda v: _is_real(v) and v > 0),
    "top_k": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: _is_real(v) and 0 < v <= 1),
    "repetition_penalty": ("a number > 0", lambda v: _is_real(v) and v > 0),
    "pad_token_id": ("a token id (an int >= 0)", lambda v: _is_int(v) and v >= 0),
    "eos_token_id": ("a token id (an int >= 0)", lambda v: _is_int(v) and v >= 0),
}


def _ops(record: object, ops: Any) -> None:
    """The recorded slicing/casting of a fetch (``cloche.probes.refs``), structurally."""
    where = "args[2] (the fetch ops)"
    if ops is None:
        return
    if not isinstance(ops, (list, tuple)):
        _fail(record, where, "must be None or a list of operations", ops)
    for op in ops:
        if not isinstance(op, (list, tuple)) or len(op) != 2:
            _fail(record, where, "must hold [kind, argument] operations", op)
        kind, arg = op
        if not isinstance(kind, str):
            _fail(record, where, "must hold 'index' or 'to' operations", kind)
        if kind == "to":
            if not isinstance(arg, str) or not isinstance(getattr(torch, arg, None), torch.dtype):
                _fail(record, where, "must cast to a torch dtype name", arg)
        elif kind == "index":
            if not isinstance(arg, (list, tuple)) or not all(_index_item(i) for i in arg):
                _fail(record, where, "must index with ints, slices, None, ... or int lists", arg)
        else:
            _fail(record, where, "must hold 'index' or 'to' operations", kind)


def _index_item(item: Any) -> bool:
    if _is_int(item):
        return True
    if not isinstance(item, dict) or len(item) != 1:
        return False
    ((tag, value),) = item.items()
    if tag == "n":
        return value is None
    if tag == "b":
        return isinstance(value, bool)
    if tag == "e":
        return True
    if tag == "s":
        return (isinstance(value, (list, tuple)) and len(value) == 3
                and all(v is None or _is_int(v) for v in value) and value[2] != 0)
    if tag == "l":
        return isinstance(value, (list, tuple)) and all(_is_int(v) or isinstance(v, bool)
                                                        for v in value)
    return False


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
    ``return_loss``: compute the mean next-token loss where the model runs (a float crosses
    the wire, not the logits); without it and without ``return_logits`` no logits are computed
    beyond what a probe reads.
    """

    heavy: ClassVar[bool] = True
    ids: torch.Tensor
    mask: torch.Tensor
    forward: ProbePlanSpec = field(default_factory=dict)
    backward_probes: ProbePlanSpec = field(default_factory=dict)
    save: str = "default"
    backward: Any = None
    return_logits: bool = True
    return_loss: bool = False
    micro_batches: int = 1

    def check(self, model: ModelInfo | None = None) -> None:
        _tokens(self, model)
        _plan(self, "forward", model)
        _plan(self, "backward_probes", model)
        _name_field(self, "save")
        backward = self.backward
        if not (backward is None or backward is True or callable(backward)):
            _fail(self, "backward", "must be None, True or a function", backward)
        if self.backward_probes and backward is None:
            _fail(self, "backward_probes", "need a backward pass (backward=True or a function)",
                  sorted(self.backward_probes))
        if backward is True and model is not None and not model.causal:
            _fail(self, "backward", "cannot be True (next-token loss) on a non-causal model:"
                  " pass a function", backward)
        _bool_field(self, "return_logits")
        _bool_field(self, "return_loss")
        _int_field(self, "micro_batches", low=1)


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

    def check(self, model: ModelInfo | None = None) -> None:
        if model is not None and not model.causal:
            raise UsageError("generate needs a causal language model")
        _tokens(self, model)
        _plan(self, "forward", model)
        _name_field(self, "save")
        _generate_options(self, model)
        _int_field(self, "seed", low=0, high=1 << 64)


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
    #: every this many batches the run's pending writes are checkpointed (durable with a
    #: state dir); ``resume=True`` continues a run from its last checkpoint
    checkpoint_every: int | None = None
    resume: bool = False
    #: a folder (where the model runs) for activation shards of ``export_points``
    export: str | None = None
    export_points: tuple[str, ...] = ()
    export_dtype: str = "float16"
    export_shard_tokens: int = 1 << 16

    def check(self, model: ModelInfo | None = None) -> None:
        from cloche.data import Dataset

        dataset = self.dataset
        texts = (isinstance(dataset, (list, tuple)) and bool(dataset)
                 and all(isinstance(t, str) for t in dataset))
        if not (isinstance(dataset, Dataset) or texts
                or (isinstance(dataset, str) and dataset)):
            _fail(self, "dataset", "must be a cloche.data.Dataset, a dataset name or path, or a"
                  " non-empty list of texts", dataset)
        _plan(self, "forward", model)
        _name_field(self, "save")
        _int_field(self, "batch_size", low=1)
        _int_field(self, "limit", low=0, optional=True)
        _int_field(self, "micro_batches", low=1)
        _int_field(self, "checkpoint_every", low=1, optional=True)
        _bool_field(self, "resume")
        points = self.export_points
        if not isinstance(points, (list, tuple)) or not all(
                isinstance(p, str) and p for p in points):
            _fail(self, "export_points", "must be a list of probe point names", points)
        if not (isinstance(self.export_dtype, str) and self.export_dtype in EXPORT_DTYPES):
            _fail(self, "export_dtype", f"must be one of {', '.join(EXPORT_DTYPES)}",
                  self.export_dtype)
        _int_field(self, "export_shard_tokens", low=1)
        if self.export is None:
            if points:
                _fail(self, "export_points", "needs export= (a folder) to write to", points)
            return
        _name_field(self, "export")
        if not points:
            _fail(self, "export_points", "must name at least one probe point to export", points)
        known = frozenset(model.point_names) if model is not None else frozenset()
        for point in points:
            if known and point not in known:
                _fail(self, "export_points", "must name probe points of the model", point,
                      UnknownProbePoint)


#: the dtypes ``run_dataset(export=...)`` writes activations in
EXPORT_DTYPES = ("float16", "bfloat16", "float32")


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

    def check(self, model: ModelInfo | None = None) -> None:
        if not callable(self.fn):
            _fail(self, "fn", "must be a function", self.fn)
        if not isinstance(self.args, (tuple, list)):
            _fail(self, "args", "must be a tuple of arguments", self.args)
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            _fail(self, "kwargs", "must map argument names (strings) to values", self.kwargs)
        rank: Any = self.rank
        world = model.world_size if model is not None else None
        if rank is not None and not (isinstance(rank, str) and rank == "all") and not (
                _is_int(rank) and rank >= 0 and (world is None or rank < world)):
            _fail(self, "rank", f"must be None, 'all' or a rank in [0, {world or '...'})", rank)


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

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "name")
        action = self.action
        if not isinstance(action, str) or action not in _ACTION_ARITY:
            _fail(self, "action", f"must be one of {', '.join(CONTEXT_ACTIONS)}", action)
        args = self.args
        if not isinstance(args, (tuple, list)) or len(args) != _ACTION_ARITY[action]:
            _fail(self, "args", f"must hold {_ACTION_ARITY[action]} argument(s) for"
                  f" {action!r}", args)
        if action == "fetch":
            key, mode, ops = args
            if not isinstance(key, str):
                _fail(self, "args[0] (the key)", "must be a string", key)
            if not isinstance(mode, str) or mode not in _FETCH_MODES:
                _fail(self, "args[1] (the fetch mode)", f"must be one of {_FETCH_MODES}", mode)
            _ops(self, ops)
        elif action == "fetch_many":
            keys, mode = args
            if keys is not None and not (isinstance(keys, (list, tuple))
                                         and all(isinstance(k, str) for k in keys)):
                _fail(self, "args[0] (the keys)", "must be None (every key) or a list of strings",
                      keys)
            if not isinstance(mode, str) or mode not in _FETCH_MODES:
                _fail(self, "args[1] (the fetch mode)", f"must be one of {_FETCH_MODES}", mode)
        elif action == "result" and not isinstance(args[0], str):
            _fail(self, "args[0] (the reducer name)", "must be a string", args[0])
        elif action in ("persist", "restore") and not (isinstance(args[0], str) and args[0]):
            _fail(self, "args[0] (the path)", "must be a non-empty string", args[0])


@dataclass(frozen=True, kw_only=True)
class AttachDictionary(Request[dict[str, Any]]):
    """Attach a dictionary at canonical point ``point`` under ``name``, where the point lives.

    ``build(config, weights, path)`` makes its module there (``cloche.dictionaries`` supplies
    it): from ``config`` (a SAELens ``cfg.json`` as a dict) and ``weights`` (tensors), or from
    ``path``, a SAELens folder on the server. ``point`` ``None``: the dictionary's own
    ``hook_name``; ``out_point`` (a transcoder's output) ``None``: its ``hook_name_out``.
    Its features, reconstruction and error become the probe points
    ``dict:<name>:features|reconstruction|error``. Returns a summary of the dictionary.
    """

    heavy: ClassVar[bool] = True
    name: str
    point: str | None
    build: Callable[..., Any]
    config: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] | None = None
    path: str | None = None
    out_point: str | None = None

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "name")
        if ":" in self.name:
            _fail(self, "name", "must not contain ':'", self.name)
        for name in ("point", "out_point"):
            value = getattr(self, name)
            if value is not None:
                _name_field(self, name)
                if model is not None and model.point_names and value not in model.point_names:
                    _fail(self, name, "must name a probe point of the model", value,
                          UnknownProbePoint)
        if not callable(self.build):
            _fail(self, "build", "must be a function", self.build)
        if self.path is None:
            if not isinstance(self.config, dict):
                _fail(self, "config", "must be a dict (cfg.json) when no path is given",
                      self.config)
            if not isinstance(self.weights, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor)
                    for k, v in self.weights.items()):
                _fail(self, "weights", "must map weight names to tensors", self.weights)
        elif not isinstance(self.path, str) or not self.path:
            _fail(self, "path", "must be None or a non-empty string", self.path)


@dataclass(frozen=True, kw_only=True)
class DetachDictionary(Request[None]):
    """Remove the dictionary ``name`` and its probe points."""

    heavy: ClassVar[bool] = True
    name: str

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "name")


# --------------------------------------------------------------------------- light requests


@dataclass(frozen=True, kw_only=True)
class Dictionaries(Request[dict[str, dict[str, Any]]]):
    """The attached dictionaries: name -> summary (point, sizes, rank, conventions)."""



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

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "point")
        if (model is not None and model.point_names and self.point not in model.point_names
                and not self.point.startswith(DERIVED_PREFIX)):
            _fail(self, "point", "must name a probe point of the model", self.point,
                  UnknownProbePoint)


@dataclass(frozen=True, kw_only=True)
class Param(Request[torch.Tensor]):
    """A weight, or its gradient after a backward run, by canonical or raw name.

    ``index`` selects a part of the canonical tensor where the weight lives, so that only that
    part is copied and sent: index items encoded as a save context's fetch encodes them
    (``cloche.probes.refs.encode_index``: ints, slices, None, ..., int lists).
    """

    name: str
    grad: bool = False
    index: list[Any] | None = None

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "name")
        _bool_field(self, "grad")
        if self.index is not None and (not isinstance(self.index, (list, tuple))
                                       or not all(_index_item(i) for i in self.index)):
            _fail(self, "index", "must index with ints, slices, None, ... or int lists",
                  self.index)


@dataclass(frozen=True, kw_only=True)
class ParamNames(Request[list[str]]):
    """Weight names: canonical ones (that exist) first, then every raw parameter name."""

    canonical: bool = True

    def check(self, model: ModelInfo | None = None) -> None:
        _bool_field(self, "canonical")


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
class Quota(Request[None]):
    """Cap the bytes saved in contexts named ``prefix...`` (``max_bytes`` None lifts it).

    The operator's request, never a client's: a server sets one per principal (its token
    file's ``max-saved-bytes``), sessions cannot send it, and it is not on the wire's list of
    records. ``label`` names the cap in the error a run that would exceed it gets.
    """

    prefix: str
    max_bytes: int | None
    label: str

    def check(self, model: ModelInfo | None = None) -> None:
        _name_field(self, "prefix")
        _int_field(self, "max_bytes", low=0, optional=True)
        _name_field(self, "label")


@dataclass(frozen=True, kw_only=True)
class ServerStatus(Request[dict[str, Any]]):
    """What the server is doing, as this session may see it: the queue, the running request,
    sessions, connections, memory (answered by the server itself, not by an executor)."""


@dataclass(frozen=True, kw_only=True)
class Ping(Request[Any]):
    """A round trip; returns ``value``."""

    value: Any = None
