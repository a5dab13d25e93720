"""What a sharded model needs on each rank, worked out before any weight is read (``cloche plan``).

The model is built on the ``meta`` device from its config alone (a directory, a ``config.json``
file or a hub name, of which only ``config.json`` is fetched), split with the very plan
``cloche serve --world-size N`` uses (:func:`cloche.sharding.shard.make_plan`), and every
parameter is counted on the rank that loads it (:class:`~cloche.sharding.shard.Ownership`): a
tied embedding/unembedding counts on rank 0 and on the last rank, as both hold it.

Activations are an estimate on paper, for one forward pass of ``batch x seq`` tokens in the
model's dtype (see docs/distributed.md, "Planning memory"):

- the KV cache of every owned block: ``2 * batch * seq * kv_heads * head_dim`` elements each;
- plus the largest transient of one block: the residual stream in, out and normalised
  (``4 * batch * seq * d_model``), the MLP's hidden activations (``3 * batch * seq * d_ffn``),
  and the attention scores ``batch * heads * seq * seq`` (eager attention, which the
  attention-pattern probe points use); on the last rank the logits ``batch * seq * vocab`` if
  larger.

A rank fits when its weights plus that estimate are at most the device memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cloche.errors import UsageError
from cloche.model.hub import hub_errors
from cloche.sharding.plan import ShardPlan, balanced_plan
from cloche.sharding.shard import Ownership, Skeleton, plan_weights, skeleton_from_config

__all__ = ["CapacityPlan", "RankNeeds", "load_config", "plan_capacity"]

#: the "device memory" a plan checks against unless told otherwise (an 80 GiB accelerator)
DEFAULT_DEVICE_MEMORY = 80 * 2**30


@dataclass(frozen=True, kw_only=True)
class RankNeeds:
    """One rank's share: blocks ``layers`` (first, last — inclusive), its parameters and bytes."""

    rank: int
    layers: tuple[int, int]
    parameters: int
    weight_bytes: int
    activation_bytes: int  # activations and KV cache together
    kv_bytes: int
    fits: bool

    def as_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "layers": list(self.layers), "parameters": self.parameters,
                "weight_bytes": self.weight_bytes, "activation_bytes": self.activation_bytes,
                "fits": self.fits}


@dataclass(frozen=True, kw_only=True)
class CapacityPlan:
    """The per-rank needs of one model at one world size, and the smallest world size that fits."""

    model: str
    family: str
    n_layers: int
    dtype: torch.dtype
    world_size: int
    total_parameters: int
    total_weight_bytes: int
    device_memory: int
    batch: int
    seq: int
    ranks: tuple[RankNeeds, ...]
    smallest_world_size: int | None

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.ranks)

    def as_json(self) -> dict[str, Any]:
        """Exactly the documented schema of ``cloche plan --json``."""
        return {"world_size": self.world_size, "total_parameters": self.total_parameters,
                "ranks": [r.as_json() for r in self.ranks]}

    def table(self) -> str:
        """The human-readable report ``cloche plan`` prints."""
        dtype = str(self.dtype).removeprefix("torch.")
        lines = [
            (f"{self.model} ({self.family}, {self.n_layers} layers):"
             f" {self.total_parameters / 1e9:.2f} B parameters,"
             f" {_gb(self.total_weight_bytes)} of weights in {dtype}"),
            (f"activations for batch {self.batch} x {self.seq} tokens; device memory"
             f" {self.device_memory / 2**30:.1f} GiB ({_gb(self.device_memory)})"),
            f"world size {self.world_size}:",
            (f"{'rank':>4} {'layers':>9} {'parameters':>14} {'weights':>10} {'KV cache':>10}"
             f" {'act.+KV':>10} {'total':>10}  fits"),
        ]
        for r in self.ranks:
            first, last = r.layers
            lines.append(f"{r.rank:>4} {f'{first}-{last}':>9} {r.parameters:>14,}"
                         f" {_gb(r.weight_bytes):>10} {_gb(r.kv_bytes):>10}"
                         f" {_gb(r.activation_bytes):>10}"
                         f" {_gb(r.weight_bytes + r.activation_bytes):>10}"
                         f"  {'yes' if r.fits else 'NO'}")
        if self.smallest_world_size is None:
            lines.append(f"no world size up to {self.n_layers} (one block per rank) fits"
                         f" {self.device_memory / 2**30:.1f} GiB devices")
        else:
            lines.append(f"smallest world size that fits {self.device_memory / 2**30:.1f} GiB"
                         f" devices: {self.smallest_world_size}")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def load_config(source: str | os.PathLike[str], *, revision: str | None = None) -> Any:
    """The Hugging Face config of a model directory, a ``config.json`` file or a hub name.

    A hub name fetches ``config.json`` alone (through the Hugging Face cache), never weights.
    """
    import transformers

    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file() or path.is_dir():
        if revision is not None:
            raise UsageError(f"revision={revision!r} applies to hub names, but {text!r} is a"
                             " local path")
        if path.is_dir() and not (path / "config.json").is_file():
            raise UsageError(f"{text!r} is not a model directory (no config.json)")
        try:
            return transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise UsageError(f"cannot read a model config from {text!r}: {exc}") from exc
    if text.endswith(".json") or text.startswith(("/", ".", "~")):
        raise UsageError(f"{text!r} does not exist (give a model directory, a config.json file or"
                         " a hub name such as org/name)")
    config_file = _hub_config(text, revision)  # the config alone, never weights
    try:
        return transformers.AutoConfig.from_pretrained(config_file, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot read the config of {text!r}: {exc}") from exc


def _hub_config(repo_id: str, revision: str | None) -> Path:
    """``config.json`` of a hub repository, through the Hugging Face cache (fetched if missing
    and online); errors say what to do, as ``cloche.model.hub`` does for whole models."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    at = f" at revision {revision!r}" if revision else ""
    with hub_errors(repo_id, revision):
        try:
            return Path(hf_hub_download(repo_id, "config.json", revision=revision))
        except HFValidationError as exc:
            raise UsageError(f"{repo_id!r} is neither a model directory, a config.json file"
                             f" nor a hub name like 'org/name' ({exc})") from exc
        except LocalEntryNotFoundError as exc:
            mode = ("offline mode (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                    else "the hub could not be reached")
            raise UsageError(f"the Hugging Face cache ({constants.HF_HUB_CACHE}) has no"
                             f" config.json of {repo_id!r}{at}; {mode}. Run once with network"
                             " access, or give a local config.json") from exc
        except EntryNotFoundError as exc:
            raise UsageError(f"the hub repository {repo_id!r}{at} has no config.json: it is"
                             " not a transformers model") from exc


@dataclass(frozen=True)
class _Dims:
    d_model: int
    d_ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


def _first(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return value
    return None


def _dims(config: Any) -> _Dims:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    d_model = int(_first(text, ("hidden_size", "n_embd", "d_model")))
    heads = int(_first(text, ("num_attention_heads", "n_head", "num_heads")))
    kv = _first(text, ("num_key_value_heads", "num_kv_heads"))
    if kv is None and getattr(text, "multi_query", False):
        kv = 1
    head_dim = _first(text, ("head_dim",)) or d_model // heads
    d_ffn = _first(text, ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size"))
    moe = _first(text, ("moe_intermediate_size",))
    if moe:  # routed experts: each token goes through the top-k of them
        d_ffn = int(moe) * int(_first(text, ("num_experts_per_tok",)) or 1)
    return _Dims(d_model=d_model, d_ffn=int(d_ffn or 4 * d_model), heads=heads,
                 kv_heads=int(kv or heads), head_dim=int(head_dim),
                 vocab=int(_first(text, ("vocab_size",)) or 0))


def _activation_bytes(dims: _Dims, n_blocks: int, last: bool, batch: int, seq: int,
                      itemsize: int) -> tuple[int, int]:
    """(activations + KV cache, KV cache) in bytes for one rank: see the module docstring."""
    tokens = batch * seq
    kv = n_blocks * 2 * tokens * dims.kv_heads * dims.head_dim * itemsize
    block = (4 * tokens * dims.d_model + 3 * tokens * dims.d_ffn
             + batch * dims.heads * seq * seq) * itemsize
    logits = tokens * dims.vocab * itemsize if last else 0
    return kv + max(block, logits), kv


class _Counter:
    """Every distinct parameter of the meta model with the places it is loaded: ``"head"``
    (rank 0), ``"tail"`` (the last rank) or a block index — what ``build_shard`` keeps."""

    def __init__(self, sk: Skeleton, plan: ShardPlan) -> None:
        own = Ownership(sk, plan)  # where a module sits does not depend on the plan
        places: dict[int, tuple[torch.nn.Parameter, set[Any]]] = {}
        for name, param in sk.meta_model.named_parameters(remove_duplicate=False):
            path = name.rpartition(".")[0]
            side = own.side(path)
            layer = own.layer_of(path) if side == "layer" else None
            place: Any = layer if layer is not None else ("head" if side == "head" else "tail")
            places.setdefault(id(param), (param, set()))[1].add(place)
        self.params = list(places.values())
        self.total = sum(p.numel() for p, _ in self.params)
        self.total_bytes = sum(p.numel() * p.element_size() for p, _ in self.params)

    def count(self, plan: ShardPlan, rank: int) -> tuple[int, int]:
        """(parameters, bytes) that ``rank`` loads under ``plan``."""
        start, stop = plan.ranges[rank]
        held: set[Any] = set(range(start, stop))
        if rank == 0:
            held.add("head")
        if rank == plan.last:
            held.add("tail")
        mine = [p for p, places in self.params if places & held]
        return sum(p.numel() for p in mine), sum(p.numel() * p.element_size() for p in mine)


def plan_capacity(source: str | os.PathLike[str] | Any, world_size: int | None = None, *,
                  revision: str | None = None, dtype: str | torch.dtype | None = None,
                  device_memory: int = DEFAULT_DEVICE_MEMORY, batch: int = 1, seq: int = 2048,
                  layers_per_rank: Sequence[int] | None = None) -> CapacityPlan:
    """Per-rank needs of ``source`` (a model directory, a ``config.json``, a hub name or a
    config object) split over ``world_size`` ranks as ``cloche serve`` splits it.

    ``world_size=None`` plans for the smallest world size whose every rank fits
    ``device_memory`` (a :class:`UsageError` says so if none does).
    """
    for name, value in (("batch", batch), ("seq", seq), ("device_memory", device_memory)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name} ({value!r}) must be a positive int")
    if isinstance(source, (str, os.PathLike)):
        config, label = load_config(source, revision=revision), os.fspath(source)
    else:
        config, label = source, getattr(source, "name_or_path", "") or source.model_type
    sk = skeleton_from_config(config, dtype)
    blocks, head, tail = plan_weights(sk)
    n_layers = len(blocks)
    dims = _dims(config)
    itemsize = torch.empty((), dtype=sk.dtype).element_size()
    counter = _Counter(sk, ShardPlan(n_layers=n_layers, ranges=((0, n_layers),)))

    def needs(plan: ShardPlan) -> tuple[RankNeeds, ...]:
        out = []
        for rank, (start, stop) in enumerate(plan.ranges):
            params, nbytes = counter.count(plan, rank)
            act, kv = _activation_bytes(dims, stop - start, rank == plan.last, batch, seq,
                                        itemsize)
            out.append(RankNeeds(rank=rank, layers=(start, stop - 1), parameters=params,
                                 weight_bytes=nbytes, activation_bytes=act, kv_bytes=kv,
                                 fits=nbytes + act <= device_memory))
        return tuple(out)

    smallest = None
    # the total weights over the device memory is a lower bound; fewer ranks cannot fit
    lower = max(1, math.ceil(sum(blocks) * itemsize / device_memory))
    for size in range(min(lower, n_layers), n_layers + 1):
        candidate = needs(balanced_plan(size, blocks, head_params=head, tail_params=tail))
        if all(r.fits for r in candidate):
            smallest = size
            break
    if world_size is None and layers_per_rank is not None:
        world_size = len(layers_per_rank)
    if world_size is None:
        if smallest is None:
            raise UsageError(f"no world size up to {n_layers} (one block per rank) fits"
                             f" {device_memory / 2**30:.1f} GiB devices; give --world-size to"
                             " see the split anyway")
        world_size = smallest
    plan = balanced_plan(world_size, blocks, head_params=head, tail_params=tail,
                         layers_per_rank=layers_per_rank)
    ranks = needs(plan)
    return CapacityPlan(model=label, family=config.model_type, n_layers=n_layers,
                        dtype=sk.dtype, world_size=world_size,
                        total_parameters=counter.total, total_weight_bytes=counter.total_bytes,
                        device_memory=device_memory, batch=batch, seq=seq, ranks=ranks,
                        smallest_world_size=smallest)
