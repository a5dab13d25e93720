"""The catalog of probe points: canonical names, aliases, and where each point is hooked.

Canonical names are architecture independent (``layers.3.mlp.post``); ``module:<path>:input``
and ``module:<path>:output`` reach any module. TransformerLens names
(``blocks.3.hook_resid_pre``) are accepted as aliases and resolved to canonical ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection
from dataclasses import dataclass, replace

from torch import nn

from cloche.errors import UnknownProbePoint
from cloche.model.families import Adapter, Site

ATTENTION_INTERNALS = ("q", "k", "v", "pattern", "z")

_BLOCK_ORDER = (
    "resid_pre", "ln1", "attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z", "attn.out",
    "resid_mid", "ln2", "mlp.router", "mlp.pre", "mlp.pre_linear", "mlp.post", "mlp.out",
    "resid_post",
)


@dataclass(frozen=True)
class ProbePoint:
    """A named place in the model where a probe can read or replace a tensor.

    ``shape`` uses the strings ``"batch"`` and ``"seq"`` for the dimensions that depend on the
    input; ``None`` when the shape is not known (a module that never ran on a probe input).
    """

    name: str
    kind: str
    layer: int | None
    shape: tuple[str | int, ...] | None = None
    module: str | None = None


@dataclass(frozen=True)
class PointSpec:
    """Where and how a point is hooked (internal to the runtime)."""

    name: str
    kind: str
    layer: int | None
    site: Site | None = None  # absolute module path
    attention: str | None = None  # one of ATTENTION_INTERNALS
    expert: int | None = None  # mlp.experts.{expert}.post; site is the experts module


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _kind_of(suffix: str) -> str:
    if "." in suffix:
        return suffix.split(".")[0]
    return "resid" if suffix.startswith("resid") else "ln"


def build_specs(hf_model: nn.Module, adapter: Adapter | None) -> dict[str, PointSpec]:
    """Every canonical point of ``hf_model`` (plus module points), in forward order."""
    modules = dict(hf_model.named_modules())
    specs: dict[str, PointSpec] = {}
    if adapter is not None and adapter.layers in modules:
        config = hf_model.config
        parallel = adapter.is_parallel(config)
        if adapter.embed in modules:
            specs["embed"] = PointSpec("embed", "embed", None, Site(adapter.embed, "output"))
        layers = modules[adapter.layers]
        for i in range(len(layers)):
            base = f"{adapter.layers}.{i}"
            for suffix in _BLOCK_ORDER:
                name = f"layers.{i}.{suffix}"
                if suffix.startswith("attn.") and suffix[5:] in ATTENTION_INTERNALS:
                    if adapter.attention and _join(base, adapter.attention) in modules:
                        specs[name] = PointSpec(name, "attn", i, attention=suffix[5:])
                    continue
                if suffix == "mlp.router":
                    specs.update(_moe_specs(modules, adapter, i))
                    continue
                choices = adapter.block_sites.get(suffix, ())
                if suffix == "resid_mid" and parallel:
                    continue
                for site in choices if isinstance(choices, tuple) else (choices,):
                    path = _join(base, site.module)
                    if path in modules:
                        specs[name] = PointSpec(name, _kind_of(suffix), i,
                                                replace(site, module=path))
                        break
        if adapter.final_norm and adapter.final_norm in modules:
            specs["final_norm"] = PointSpec(
                "final_norm", "ln", None, Site(adapter.final_norm, "output")
            )
        # logits at the model's output ("") only where the model has its head: a base model
        # saved without it (LlamaModel) returns hidden states there
        if adapter.logits in modules and (adapter.logits or adapter.unembed in modules):
            specs["logits"] = PointSpec("logits", "logits", None, Site(adapter.logits, "output"))
    for path in modules:
        if not path:
            continue
        for where in ("input", "output"):
            name = f"module:{path}:{where}"
            specs[name] = PointSpec(name, "module", _layer_of(path, adapter), Site(path, where))
    return specs


_CANONICAL_GLOBAL = ("embed", "final_norm", "logits")


def missing_points(adapter: Adapter | None, config: object, names: Collection[str],
                   model_type: str | None = None) -> tuple[str, ...]:
    """The canonical points this model lacks, each as ``"<pattern>: <why>"``.

    Block points are given as ``layers.*.<suffix>``. Read by :func:`canonical_name` to say why a
    name is refused, and shown by ``model.info()``.
    """
    if adapter is None:
        why = (f"model_type {model_type!r} has no cloche adapter, so cloche cannot tell where its"
               " canonical points are; use module:<path>:input|output points (probe_points()"
               " lists them)")
        return tuple(f"{p}: {why}" for p in (*_CANONICAL_GLOBAL,
                                              *(f"layers.*.{s}" for s in _BLOCK_ORDER)))
    parallel = adapter.is_parallel(config)
    out = []
    moe = adapter.experts is not None
    per_layer: dict[str, set[str]] = {}
    for name in names:
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match:
            per_layer.setdefault(match.group(1), set()).add(match.group(2))
    everywhere = set.intersection(*per_layer.values()) if per_layer else set()
    for suffix in _BLOCK_ORDER:
        if suffix in everywhere or (suffix == "mlp.router" and not moe):
            continue
        if suffix in adapter.lacks:
            why = adapter.lacks[suffix]
        elif moe and suffix in ("mlp.pre", "mlp.pre_linear", "mlp.post"):
            why = ("a mixture-of-experts block has no single MLP: each expert's activations are"
                   " layers.i.mlp.experts.<e>.post, the router's logits layers.i.mlp.router")
        elif suffix == "mlp.router":
            why = "this block is dense (not a mixture of experts)"
        elif suffix == "resid_mid" and parallel:
            why = ("attention and MLP run in parallel in this architecture (both read resid_pre),"
                   " so no residual stream exists between them; resid_pre + attn.out is the"
                   " nearest quantity (TransformerLens has no hook_resid_mid here either)")
        elif suffix == "ln2" and parallel:
            why = "attention and MLP read the same normalised input: use ln1"
        elif suffix == "mlp.pre_linear":
            why = "the MLP is not gated: mlp.pre is its only input projection"
        elif suffix.startswith("attn.") and suffix[5:] in ATTENTION_INTERNALS:
            why = (f"{adapter.family} computes attention inline (not through transformers'"
                   " AttentionInterface), so cloche cannot tap q/k/v/pattern/z yet; attn.out and"
                   " module:<path> points are available")
        else:
            why = f"the {adapter.family} architecture has no such tensor"
        out.append(f"layers.*.{suffix}: {why}")
    out.extend(f"{name}: the {adapter.family} architecture has no such module"
               for name in _CANONICAL_GLOBAL if name not in names)
    return tuple(out)


def _why_missing(name: str, missing: Collection[str]) -> str | None:
    match = re.match(r"^layers\.\d+\.(.+)$", name)
    pattern = f"layers.*.{match.group(1)}" if match else name
    for line in missing:
        point, _, why = line.partition(": ")
        if point == pattern:
            return why
    return None


def _moe_specs(modules: dict[str, nn.Module], adapter: Adapter, i: int) -> dict[str, PointSpec]:
    """Router and per-expert points of block ``i``, if it is a mixture-of-experts block."""
    base = f"{adapter.layers}.{i}"
    if adapter.router is None or adapter.experts is None:
        return {}
    router, experts = _join(base, adapter.router), _join(base, adapter.experts)
    if router not in modules or experts not in modules:  # a dense block of a sparse model
        return {}
    specs = {f"layers.{i}.mlp.router": PointSpec(f"layers.{i}.mlp.router", "router", i,
                                                 Site(router, "output", flat=True))}
    for e in range(int(getattr(modules[experts], "num_experts", 0))):
        name = f"layers.{i}.mlp.experts.{e}.post"
        specs[name] = PointSpec(name, "mlp", i, Site(experts, "output", flat=True), expert=e)
    return specs


def _layer_of(path: str, adapter: Adapter | None) -> int | None:
    if adapter is None or not path.startswith(adapter.layers + "."):
        return None
    head = path[len(adapter.layers) + 1 :].split(".")[0]
    return int(head) if head.isdigit() else None


_TL_BLOCK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_v": "attn.v",
    "attn.hook_rot_q": "attn.q",
    "attn.hook_rot_k": "attn.k",
    "attn.hook_pattern": "attn.pattern",
    "attn.hook_z": "attn.z",
    "mlp.hook_pre": "mlp.pre",
    "mlp.hook_pre_linear": "mlp.pre_linear",
    "mlp.hook_post": "mlp.post",
    "ln1.hook_normalized": "ln1",
    "ln2.hook_normalized": "ln2",
}
_TL_GLOBAL = {"hook_embed": "embed", "ln_final.hook_normalized": "final_norm"}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def canonical_name(name: str, names: Collection[str], missing: Collection[str] = ()) -> str:
    """Resolve ``name`` (canonical, TransformerLens alias, or module point) to a canonical name.

    ``names`` are the model's point names (a set, or the specs dict keyed by name); ``missing``
    the canonical points it lacks and why (:func:`missing_points`), which errors then name.
    """
    if name in names:
        return name
    resolved = _TL_GLOBAL.get(name)
    match = _TL_RE.match(name)
    if match and match.group(2) in _TL_BLOCK:
        resolved = f"layers.{match.group(1)}.{_TL_BLOCK[match.group(2)]}"
    if resolved is not None and resolved in names:
        return resolved
    why = _why_missing(resolved or name, missing)
    if why is not None:
        raise UnknownProbePoint(f"this model has no probe point {name!r}: {why}")
    if name.startswith("module:") and not name.endswith((":input", ":output")):
        hint = " (module points end in ':input' or ':output')"
    else:
        canonical = sorted(s for s in names if not s.startswith("module:"))
        close = difflib.get_close_matches(name, canonical, n=4, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
    raise UnknownProbePoint(f"unknown probe point {name!r}{hint}")
