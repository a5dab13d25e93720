"""Build one rank's shard: a model skeleton on the meta device with only owned modules real.

The skeleton is built from the config on the ``meta`` device (no memory), modules owned by other
ranks are swapped for stubs (``sharding.stubs``), what is left is materialised with ``to_empty`` and
filled from the safetensors files — reading only the byte ranges of the tensors this rank needs
(see :class:`_SafetensorsFile`). Buffers that are not in the checkpoint (rotary ``inv_freq``)
are recomputed, since ``to_empty`` leaves them as garbage.

:class:`Ownership` answers "which rank holds this module / probe point / parameter" for a plan;
rank 0 uses it to route requests, every rank to pick its own probes.
"""

from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from cloche.errors import UsageError
from cloche.model.discover import discover_from_config
from cloche.model.families import Adapter
from cloche.model.loader import Loaded, has_lm_head, model_from_config, parse_dtype
from cloche.model.points import PointSpec
from cloche.model.rebase import adapter_for_model
from cloche.sharding.plan import ShardPlan, balanced_plan
from cloche.sharding.stubs import (
    LogitsStub,
    PassBlock,
    Passthrough,
    Pipeline,
    ReceiveBlock,
    SendBlock,
    ZeroEmbedding,
    ZeroHidden,
)

__all__ = ["Ownership", "Skeleton", "build_shard", "make_plan", "plan_weights", "skeleton",
           "skeleton_from_config"]


@dataclass
class Skeleton:
    """The whole model on the meta device: its structure, names and sizes, but no memory."""

    path: Path
    config: Any
    adapter: Adapter
    meta_model: nn.Module
    dtype: torch.dtype


def skeleton(model_dir: str | Path, dtype: str | torch.dtype | None = None) -> Skeleton:
    """The meta-device model of the checkpoint in the local directory ``model_dir`` (a hub name
    is resolved to one by the launcher, once, before any rank starts)."""
    import transformers

    directory = Path(model_dir).expanduser()
    if not (directory / "config.json").is_file():
        raise UsageError(f"{str(directory)!r} is not a model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    return skeleton_from_config(config, dtype, directory)


def skeleton_from_config(config: Any, dtype: str | torch.dtype | None = None,
                         path: str | Path = ".") -> Skeleton:
    """The meta-device model of a Hugging Face ``config`` (no weights anywhere): what
    :func:`skeleton` builds for a checkpoint, and what ``cloche plan`` sizes."""
    resolved = parse_dtype(dtype)
    if resolved == "auto":
        resolved = getattr(config, "dtype", None) or torch.float32
        if isinstance(resolved, str):
            resolved = getattr(torch, resolved)
    with torch.device("meta"):  # the class the checkpoint was saved as, as load_hf does
        meta_model = model_from_config(config, cast(torch.dtype, resolved))
    meta_model.eval()
    # a family without a table: its structure is discovered on a small copy (two blocks, random
    # weights), as no process holds the whole model
    adapter = adapter_for_model(meta_model) or discover_from_config(config)
    if adapter is None:
        raise UsageError(
            f"model_type {config.model_type!r} has no cloche adapter and its structure could not"
            " be discovered (no list of num_hidden_layers identical blocks whose inputs are"
            " output_hidden_states, or no input embedding), so it cannot be split into stages"
            " by layers; load it in one process (cloche.load / cloche serve without"
            " --world-size), where its module:<path> points still work")
    return Skeleton(Path(path), config, adapter, meta_model, cast(torch.dtype, resolved))


class Ownership:
    """Which rank holds each module, probe point and parameter under ``plan``."""

    def __init__(self, sk: Skeleton, plan: ShardPlan) -> None:
        self.plan = plan
        self.layers = sk.adapter.layers
        self.unembed = sk.adapter.unembed
        self._names = [n for n, _ in sk.meta_model.named_modules()]
        self._layers_index = self._names.index(self.layers)
        self._tail = _tail_paths(sk.adapter)

    def side(self, path: str) -> str:
        """``"layer"``, ``"head"`` (before the blocks), ``"tail"`` (after) or ``"outer"``.

        Modules registered before the blocks run before them, except the final norm and the
        unembedding, which some families register first (OPT's final_layer_norm).
        """
        if path == self.layers or path.startswith(self.layers + "."):
            return "layer"
        if path == "" or self.layers.startswith(path + "."):
            return "outer"
        if any(path == t or path.startswith(t + ".") for t in self._tail):
            return "tail"
        return "head" if self._names.index(path) < self._layers_index else "tail"

    def layer_of(self, path: str) -> int | None:
        if not path.startswith(self.layers + "."):
            return None
        head = path[len(self.layers) + 1:].split(".")[0]
        return int(head) if head.isdigit() else None

    def module_owner(self, path: str) -> int:
        side = self.side(path)
        if side == "head":
            return 0
        if side == "layer":
            layer = self.layer_of(path)
            return self.plan.last if layer is None else self.plan.owner_of_layer(layer)
        return self.plan.last

    def point_owner(self, spec: PointSpec) -> int:
        if spec.layer is not None:
            return self.plan.owner_of_layer(spec.layer)
        if spec.name == "embed":
            return 0
        if spec.site is not None:
            return self.module_owner(spec.site.module)
        return self.plan.last

    def param_owner(self, raw_name: str) -> int:
        return self.module_owner(raw_name.rpartition(".")[0])


def _tail_paths(adapter: Adapter) -> tuple[str, ...]:
    return tuple(p for p in (adapter.final_norm, adapter.unembed) if p)


def _direct_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def plan_weights(sk: Skeleton) -> tuple[list[int], int, int]:
    """What the balanced split weighs: per-block parameter counts, then the parameters before
    the blocks (rank 0) and after them (the last rank); a tied embedding counts on both."""
    modules = dict(sk.meta_model.named_modules())
    layers = modules[sk.adapter.layers]
    blocks = [sum(p.numel() for p in block.parameters()) for block in layers]
    head = tail = 0
    probe = Ownership.__new__(Ownership)
    probe.layers = sk.adapter.layers
    probe._names = list(modules)
    probe._layers_index = probe._names.index(sk.adapter.layers)
    probe._tail = _tail_paths(sk.adapter)
    for path, module in modules.items():
        side = probe.side(path)
        if side == "head":
            head += _direct_params(module)
        elif side in ("tail", "outer"):
            tail += _direct_params(module)
    return blocks, head, tail


def make_plan(sk: Skeleton, world_size: int,
              layers_per_rank: tuple[int, ...] | list[int] | None = None) -> ShardPlan:
    """A plan balanced by parameter count (or the explicit ``layers_per_rank``)."""
    blocks, head, tail = plan_weights(sk)
    return balanced_plan(world_size, blocks, head_params=head, tail_params=tail,
                         layers_per_rank=layers_per_rank)


def _replace(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def _install_stubs(sk: Skeleton, own: Ownership, rank: int, stage: Pipeline) -> nn.Module:
    model = sk.meta_model
    plan = own.plan
    start, stop = plan.ranges[rank]
    layers: Any = model.get_submodule(sk.adapter.layers)  # an nn.ModuleList
    for i in range(plan.n_layers):
        if start <= i < stop:
            continue
        as_tuple = sk.adapter.block_returns_tuple
        if rank > 0 and i == start - 1:
            layers[i] = ReceiveBlock(i, stage, as_tuple)
        elif rank < plan.last and i == stop:
            layers[i] = SendBlock(i, stage, as_tuple)
        else:
            layers[i] = PassBlock(i, as_tuple)
    replaced: list[str] = []
    for path, module in list(model.named_modules()):
        if not path or any(path.startswith(p + ".") for p in replaced):
            continue
        side = own.side(path)
        if _direct_params(module) == 0 and not (side == "tail" and path == own.unembed):
            continue
        if side == "head" and rank != 0:
            if isinstance(module, nn.Embedding):
                _replace(model, path, ZeroEmbedding(module.embedding_dim, sk.dtype))
            elif path in (sk.adapter.embed,) or "embed" in path.split(".")[-1]:
                _replace(model, path, ZeroHidden(sk.config.hidden_size, sk.dtype))
            else:
                _replace(model, path, Passthrough())
            replaced.append(path)
        elif side == "tail" and rank != plan.last:
            if path == own.unembed or own.unembed.startswith(path + "."):
                _replace(model, path, LogitsStub(int(sk.config.vocab_size), stage))
            else:
                _replace(model, path, Passthrough())
            replaced.append(path)
    return model


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise UsageError(f"{str(directory)!r} has no safetensors weights (model.safetensors or"
                         " model.safetensors.index.json); distributed loading reads only those")
    reader = _SafetensorsFile(single)
    try:
        return dict.fromkeys(reader.header, single)
    finally:
        reader.close()


_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class _SafetensorsFile:
    """Reads single tensors of a safetensors file straight into their destination.

    ``safe_open`` maps the whole file, and every page it touches stays resident until the file
    is closed, so a rank would briefly hold its shard twice. Reading each tensor's byte range
    with ``readinto`` (the format is a JSON header, then raw little-endian data) keeps the peak
    at the shard plus one tensor. The header is parsed with safetensors' own rules checked:
    offsets inside the file, sizes matching dtype and shape.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 - closed by close(), tensor by tensor
        (length,) = struct.unpack("<Q", self._file.read(8))
        self.header = json.loads(self._file.read(length))
        self.header.pop("__metadata__", None)
        self._base = 8 + length

    def read_into(self, key: str, target: torch.Tensor) -> None:
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise UsageError(f"{key!r} in {self.path.name} has unsupported dtype {info['dtype']}")
        shape = tuple(info["shape"])
        if shape != tuple(target.shape):
            raise UsageError(f"checkpoint tensor {key!r} has shape {shape}, the model expects"
                             f" {tuple(target.shape)}")
        begin, end = info["data_offsets"]
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * torch.empty((), dtype=dtype).element_size():
            raise UsageError(f"checkpoint tensor {key!r} in {self.path.name} is malformed")
        direct = (target.device.type == "cpu" and target.dtype == dtype
                  and target.is_contiguous() and sys.byteorder == "little")
        buffer = target if direct else torch.empty(shape, dtype=dtype)
        self._file.seek(self._base + begin)
        view = buffer.reshape(-1).view(torch.uint8).numpy().data.cast("B")
        if self._file.readinto(view) != end - begin:
            raise UsageError(f"{self.path.name} ended inside tensor {key!r}")
        if not direct:
            target.copy_(buffer)

    def close(self) -> None:
        self._file.close()


# fused experts parameter -> the per-expert tensors a checkpoint may hold instead, in order
_EXPERT_PARTS = {
    ".experts.gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    ".experts.down_proj": (("w2",), ("down_proj",)),
}


def _per_expert_parts(name: str, target: torch.Tensor, files: dict[str, Path]
                      ) -> list[tuple[str, torch.Tensor]] | None:
    """Where a mixture-of-experts parameter is in a checkpoint of the per-expert layout.

    transformers keeps a block's experts as 3D parameters (``mlp.experts.gate_up_proj``:
    experts x [gate; up] x d_model) but saves and reads them per expert (Mixtral:
    ``block_sparse_moe.experts.{e}.w1/w3/w2``; Qwen-MoE, OLMoE: ``mlp.experts.{e}.gate_proj/
    up_proj/down_proj``) and converts while loading. This gives ``(checkpoint key, view of
    target)`` pairs that fill ``target`` in place, or None if the checkpoint has neither.
    """
    legacy = name.replace(".mlp.", ".block_sparse_moe.")
    if name.endswith(".mlp.gate.weight"):  # Mixtral's router
        return [(legacy, target)] if legacy in files else None
    for suffix, layouts in _EXPERT_PARTS.items():
        if not name.endswith(suffix):
            continue
        for base in (name, legacy):
            prefix = base[: -len(suffix)] + ".experts."
            for names in layouts:
                keys = [[f"{prefix}{e}.{n}.weight" for n in names] for e in range(len(target))]
                if all(k in files for row in keys for k in row):
                    return [(k, view) for e, row in enumerate(keys)
                            for k, view in zip(row, target[e].chunk(len(row)), strict=True)]
    return None


def _load_owned(model: nn.Module, sk: Skeleton) -> None:
    files = _checkpoint_files(sk.path)
    tied = dict(getattr(model, "_tied_weights_keys", None) or {}) \
        if getattr(sk.config, "tie_word_embeddings", False) else {}
    prefix = getattr(model, "base_model_prefix", "")
    wanted: dict[Path, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        candidates = [name, tied.get(name)]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1:])
        elif prefix:  # a base model (BertModel) from a checkpoint that kept the prefix
            candidates.append(f"{prefix}.{name}")
        key = next((c for c in candidates if c is not None and c in files), None)
        if key is None:
            parts = _per_expert_parts(name, tensor.data, files)
            if parts is None:
                raise UsageError(f"the checkpoint in {str(sk.path)!r} has no tensor for"
                                 f" {name!r}")
            for part_key, view in parts:
                wanted.setdefault(files[part_key], []).append((part_key, view))
            continue
        wanted.setdefault(files[key], []).append((key, tensor))
    with torch.no_grad():
        for file, items in wanted.items():
            reader = _SafetensorsFile(file)
            try:
                for key, target in items:
                    reader.read_into(key, target.data)
            finally:
                reader.close()


def _recompute_buffers(model: nn.Module, persistent: set[str], device: torch.device) -> None:
    """Non-persistent buffers are not in the checkpoint and ``to_empty`` left them as garbage."""
    for path, module in model.named_modules():
        own = [(n, b) for n, b in module.named_buffers(recurse=False)
               if f"{path}.{n}".lstrip(".") not in persistent]
        if not own:
            continue
        if type(module).__name__.endswith("RotaryEmbedding"):
            # (CodeGen's keeps no config of its own: the model's is the one it was built from)
            config = getattr(module, "config", None) or getattr(model, "config", None)
            fresh = type(module)(config=config)
            for name, value in fresh.named_buffers(recurse=False):
                getattr(module, name).copy_(value.to(device))
            continue
        for name, buffer in own:
            if name == "position_ids":
                buffer.copy_(torch.arange(buffer.shape[-1], device=device).expand_as(buffer))
            elif name == "token_type_ids":
                buffer.zero_()
            elif name == "embed_scale" and hasattr(module, "scalar_embed_scale"):
                buffer.fill_(module.scalar_embed_scale)  # Gemma's scaled embeddings
            else:
                raise UsageError(f"cannot rebuild buffer {path}.{name} of {type(module).__name__}"
                                 " after loading a shard; this architecture is not supported")


def _tokenizer(directory: Path) -> Any:
    if any((directory / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json",
                                               "vocab.txt")):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return None


def build_shard(sk: Skeleton, plan: ShardPlan, rank: int, stage: Pipeline,
                device: torch.device | str = "cpu") -> Loaded:
    """Rank ``rank``'s model: owned modules loaded from disk, every other module a stub.

    ``sk`` is consumed (its meta model becomes the shard).
    """
    device = torch.device(device)
    lm_head = has_lm_head(sk.meta_model)  # before stubs stand in for other ranks' modules
    own = Ownership(sk, plan)
    model = _install_stubs(sk, own, rank, stage)
    persistent = set(model.state_dict().keys())
    model.to_empty(device=device)
    _load_owned(model, sk)
    _recompute_buffers(model, persistent, device)
    if (sk.path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        generation = GenerationConfig.from_pretrained(sk.path)
        # nn.Module.__setattr__ is typed for tensors and modules; any attribute is fine at runtime
        model.generation_config = generation  # type: ignore[assignment]
    model.eval()
    return Loaded(model, _tokenizer(sk.path), sk.path, lm_head=lm_head)
