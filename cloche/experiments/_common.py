"""Plumbing the experiment modules share: scratch save contexts, unit specs, datasets, hashing.

Everything here is used on both sides of the connection. Functions that run inside probes on
the server (:func:`select_units`, :func:`sample_keys`) are plain module-level functions, so
cloudpickle ships them by reference and the server imports its own copy of this module.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import numpy as np
import torch

from cloche.errors import ClocheError, UsageError

#: A unit spec after normalisation: ("all",), ("index", LongTensor (n,)) or
#: ("direction", FloatTensor (n, d)) — small values that travel inside probe closures.
UnitSpec = tuple

F = TypeVar("F", bound=Callable[..., Any])


def scratch_name(kind: str) -> str:
    """A save-context name no other experiment call uses."""
    return f"exp/{kind}/{uuid.uuid4().hex[:12]}"


@contextlib.contextmanager
def scratch(model: Any, kind: str) -> Iterator[str]:
    """A fresh save-context name, cleared when the experiment is done (also on errors)."""
    name = scratch_name(kind)
    try:
        yield name
    finally:
        with contextlib.suppress(ClocheError, OSError):
            model.save_context(name).clear()


def as_tensor(value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """numpy arrays, lists and tensors as a CPU tensor (detached)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
    else:
        t = torch.as_tensor(np.asarray(value))
    return t.to(dtype) if dtype is not None else t


def to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def is_direction(unit: Any) -> bool:
    """True for float vectors / matrices (directions), False for integer indices."""
    if isinstance(unit, torch.Tensor):
        return unit.dtype.is_floating_point
    if isinstance(unit, np.ndarray):
        return np.issubdtype(unit.dtype, np.floating)
    return isinstance(unit, (list, tuple)) and bool(unit) and all(
        isinstance(u, float) for u in unit)


def unit_spec(unit: Any) -> UnitSpec:
    """Normalise what a user calls a unit.

    ``None`` — every unit of the point; an ``int`` or a list of ints — those units (indices
    into the point's trailing dimensions, flattened: for ``attn.z`` unit ``h * d_head + j``);
    a float vector ``(d,)`` or matrix ``(n, d)`` — projections onto those directions.
    """
    if unit is None:
        return ("all",)
    if isinstance(unit, bool):
        raise UsageError(f"a unit is an int, a list of ints or a direction, not {unit!r}")
    if isinstance(unit, (int, np.integer)):
        return ("index", torch.tensor([int(unit)], dtype=torch.long))
    if is_direction(unit):
        d = as_tensor(unit, torch.float32)
        if d.dim() == 1:
            d = d[None]
        if d.dim() != 2:
            raise UsageError(f"a direction is (d,) or (n, d), got shape {tuple(d.shape)}")
        return ("direction", d)
    try:
        idx = as_tensor(unit).reshape(-1).long()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"a unit is an int, a list of ints or a direction, not {unit!r}") from exc
    if idx.numel() == 0:
        raise UsageError("the list of units is empty")
    return ("index", idx)


def select_units(x: torch.Tensor, spec: UnitSpec) -> torch.Tensor:
    """(batch, seq, ...) activations -> (batch, seq, n) values of the units in ``spec``.

    Runs inside probes. Trailing dimensions are flattened, so per-head points
    (batch, seq, head, d_head) are addressed as ``head * d_head + j``.
    """
    if x.dim() < 3:
        raise UsageError(f"expected (batch, seq, ...) activations, got shape {tuple(x.shape)}")
    flat = x.flatten(2)
    kind = spec[0]
    if kind == "all":
        return flat
    if kind == "index":
        idx = spec[1].to(flat.device)
        if int(idx.max()) >= flat.shape[-1] or int(idx.min()) < -flat.shape[-1]:
            raise UsageError(f"unit index {idx.tolist()} is out of range for "
                             f"{flat.shape[-1]} units")
        return flat.index_select(-1, idx % flat.shape[-1])
    if kind == "direction":
        d = spec[1].to(device=flat.device, dtype=flat.dtype)
        if d.shape[-1] != flat.shape[-1]:
            raise UsageError(f"direction has {d.shape[-1]} entries, the point has "
                             f"{flat.shape[-1]} units")
        return flat @ d.T
    raise UsageError(f"unknown unit spec {kind!r}")


def sample_keys(example_ids: torch.Tensor, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) pseudo-random int64 keys that depend only on (example id, position, seed).

    Used to draw samples on the server that do not depend on batching: keep the rows with the
    largest keys. A splitmix64-style mix in int64 arithmetic (wrapping is intended).
    """
    ids = example_ids.to(torch.int64)[:, None]
    pos = torch.arange(seq, device=ids.device, dtype=torch.int64)[None]
    h = ids * 1_000_003 + pos + int(seed) * 7_919_000_001 + 0x2545F4914F6CDD1D
    for mult in (-7046029254386353131, -4658895280553007687, -49064778989728563):
        h = (h ^ (h >> 31)) * mult
    h = h ^ (h >> 29)
    return h & ((1 << 62) - 1)


def token_dataset(tokens: Any, *, name: str = "tokens", pad_id: int = 0) -> Any:
    """A ``cloche.data.Dataset`` whose examples are the rows of a token-id tensor."""
    from cloche import data

    ids = as_tensor(tokens).long()
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise UsageError(f"token ids must be (seq,) or (batch, seq), got shape {tuple(ids.shape)}")
    return data.Dataset(ids.tolist(), name=name, seq_len=int(ids.shape[1]), pad_id=pad_id)


def as_dataset_arg(inputs: Any) -> Any:
    """What ``run_dataset`` accepts: a Dataset, a name, a list of strings; token ids become a
    Dataset here (on the client), so remote and local runs see the same examples."""
    from cloche import data

    if isinstance(inputs, (data.Dataset, str)):
        return inputs
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        return list(inputs)
    if isinstance(inputs, (torch.Tensor, np.ndarray)) or (
            isinstance(inputs, (list, tuple)) and inputs
            and all(isinstance(r, (list, tuple)) for r in inputs)):
        return token_dataset(inputs)
    raise UsageError("inputs are a cloche.data.Dataset, a dataset name, a list of strings or a "
                     f"tensor of token ids, not {type(inputs).__name__}")


def inputs_or_dataset(inputs: Any, dataset: Any) -> Any:
    """What ``run_dataset`` takes, from an experiment's ``inputs`` or its ``dataset`` (exactly one).

    One meaning for a string everywhere: in ``inputs`` a ``str`` is a text (as in
    ``model.run("...")``), and so are lists of strings; token ids and Datasets are accepted too.
    In ``dataset`` a ``str`` names a dataset (``"default:heldout"``, a path).
    """
    from cloche import data

    if (inputs is None) == (dataset is None):
        raise UsageError("give inputs (a text, texts or token ids) or dataset= (a dataset name,"
                         " path or cloche.data.Dataset): exactly one of them")
    if inputs is not None:
        return [inputs] if isinstance(inputs, str) else as_dataset_arg(inputs)
    if isinstance(dataset, (str, data.Dataset)):
        return dataset
    raise UsageError("dataset= is a dataset name or path, or a cloche.data.Dataset, not"
                     f" {type(dataset).__name__} (texts and token ids go in inputs)")


def server_dataset(m: Any, dataset: Any) -> Any:
    """On the server (inside ``model.call``): the Dataset that ``run_dataset`` builds."""
    from cloche import data

    if isinstance(dataset, data.Dataset):
        return dataset
    tokenizer = getattr(m, "tokenizer", None)
    if isinstance(dataset, str):
        return data.get(dataset, tokenizer)
    return data.from_texts(list(dataset), tokenizer)


def str_tokens(m: Any, ids: Sequence[int]) -> list[str]:
    """Decoded tokens, or ``<id>`` placeholders for a model without a tokenizer."""
    try:
        return list(m.to_str_tokens(torch.as_tensor(list(ids), dtype=torch.long)))
    except UsageError:
        return [f"<{int(i)}>" for i in ids]


def reports(fn: F) -> F:
    """Give an experiment the ``progress=`` every slow call has (``cloche.Progress``): the
    decorated function declares ``progress: ProgressArg = True`` and receives, in its place, the
    call's reporter. Runs inside it report to it by default (or pass ``progress=progress``); an
    experiment that counts its own steps calls ``progress.expect(n, unit)`` and
    ``progress.step()``. One bar, one callback contract, for every experiment."""
    from cloche import Progress

    signature = inspect.signature(fn)
    if "progress" not in signature.parameters:
        raise TypeError(f"{fn.__name__} takes no progress argument")

    @functools.wraps(fn)
    def with_progress(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        with Progress(bound.arguments["progress"], fn.__name__, unit="step") as reporter:
            reporter.begin()
            bound.arguments["progress"] = reporter
            return fn(*bound.args, **bound.kwargs)

    return cast("F", with_progress)


def layer_of(point: str) -> int | None:
    parts = point.split(".")
    if len(parts) > 1 and parts[0] == "layers" and parts[1].isdigit():
        return int(parts[1])
    return None
