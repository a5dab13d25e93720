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

from cloche.errors import UnknownProbePoint, UsageError
from cloche.model.families import Adapter, Site, adapter_for
from cloche.model.norms import norm_kind
from cloche.model.weights import HeadShape, head_shape

ATTENTION_INTERNALS = ("q", "k", "v", "pattern", "z")
#: taps inside cloche's own attention function (AttentionInterface families only): the keys
#: before grouped-query heads are expanded, and the scores before the softmax
ATTENTION_EXTRAS = ("k_grouped", "scores")

_BLOCK_ORDER = (
    "resid_pre", "ln1.scale", "ln1.normalized", "ln1", "attn.q_proj", "attn.k_proj",
    "attn.v_proj", "attn.q", "attn.k_grouped", "attn.k", "attn.v", "attn.scores",
    "attn.pattern", "attn.z", "attn.result", "attn.out", "resid_mid", "ln2.scale",
    "ln2.normalized", "ln2", "mlp.router", "mlp.pre", "mlp.pre_linear", "mlp.post", "mlp.out",
    "resid_post",
)
#: points that only some families offer and that ``missing_points`` does not list (the
#: quantities TransformerLens names that cloche's core catalog lacks; see ``_TL_BLOCK``)
_OPTIONAL = frozenset({
    "ln1.scale", "ln1.normalized", "ln2.scale", "ln2.normalized", "attn.q_proj", "attn.k_proj",
    "attn.v_proj", "attn.k_grouped", "attn.scores", "attn.result",
})
_HEADS_OF = {"attn.q_proj": "q", "attn.k_proj": "kv", "attn.v_proj": "kv"}
_RESULT_LAYOUTS = {"linear_heads_out": "linear", "conv1d_out_heads": "conv1d"}


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
    #: the site's last dimension is split into this many heads for probes (attn.q_proj, ...)
    heads: int | None = None
    #: "scale" | "normalized": a quantity inside the norm module at ``site`` (see model.norms)
    norm: str | None = None
    #: per-head attention results: the site is the output projection, whose input is z
    result: tuple[int, str] | None = None  # (n_heads, "linear" | "conv1d")
    #: one of q/k/v of a fused projection's output: ``(groups, sizes, index)`` = view the last
    #: dimension as (groups, sum(sizes)), split it into ``sizes``, take piece ``index``
    fused: tuple[int, tuple[int, ...], int] | None = None


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
        if adapter.pos_embed and adapter.pos_embed in modules:
            specs["pos_embed"] = PointSpec("pos_embed", "embed", None,
                                           Site(adapter.pos_embed, "output"))
        layers = modules[adapter.layers]
        hs = head_shape(config) if hasattr(config, "num_attention_heads") else None
        for i in range(len(layers)):
            base = f"{adapter.layers}.{i}"
            for suffix in _BLOCK_ORDER:
                name = f"layers.{i}.{suffix}"
                if suffix in _OPTIONAL:
                    spec = _optional_spec(modules, adapter, hs, i, suffix)
                    if spec is not None:
                        specs[name] = spec
                    continue
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
            if norm_kind(modules[adapter.final_norm]) is not None:
                for part in ("scale", "normalized"):
                    specs[f"final_norm.{part}"] = PointSpec(
                        f"final_norm.{part}", "ln", None, Site(adapter.final_norm, "output"),
                        norm=part)
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


def _optional_spec(modules: dict[str, nn.Module], adapter: Adapter, hs: HeadShape | None,
                   i: int, suffix: str) -> PointSpec | None:
    """The spec of one of the ``_OPTIONAL`` points of block ``i``, or None where it is absent."""
    base = f"{adapter.layers}.{i}"
    name = f"layers.{i}.{suffix}"
    attention = _join(base, adapter.attention) if adapter.attention else None
    if suffix.startswith(("ln1.", "ln2.")):
        norm, part = suffix.split(".")
        choices = adapter.block_sites.get(norm, ())
        for site in choices if isinstance(choices, tuple) else (choices,):
            path = _join(base, site.module)
            if path in modules:
                if site.where != "output" or norm_kind(modules[path]) is None:
                    return None
                return PointSpec(name, "ln", i, Site(path, "output", flat=site.flat), norm=part)
        return None
    if attention is None or attention not in modules or hs is None:
        return None
    if suffix in _HEADS_OF:
        where = adapter.block_sites.get(suffix)
        if not isinstance(where, Site) or _join(base, where.module) not in modules:
            if suffix[5:] in adapter.method_taps:  # split and tapped by the inline attention
                return PointSpec(name, "attn", i, attention=suffix[5:])
            return None
        heads = hs.n_heads if _HEADS_OF[suffix] == "q" else hs.n_kv_heads
        return PointSpec(name, "attn", i, replace(where, module=_join(base, where.module)),
                         heads=heads, fused=_fused(where.qkv, hs))
    if suffix == "attn.result":
        rule = adapter.block_weights.get("attn.W_O")
        if rule is None or rule.layout not in _RESULT_LAYOUTS:
            return None
        path = _join(base, rule.param.removesuffix(".weight"))
        if path not in modules:
            return None
        return PointSpec(name, "attn", i, Site(path, "output"),
                         result=(hs.n_heads, _RESULT_LAYOUTS[rule.layout]))
    # k_grouped and scores are taps inside cloche's own attention function, or inside the
    # family's attention function that stands in for the model's (method_taps)
    if adapter.attention_method is not None and suffix[5:] not in adapter.method_taps:
        return None
    return PointSpec(name, "attn", i, attention=suffix[5:])


def _fused(qkv: tuple[str, int] | None, hs: HeadShape) -> tuple[int, tuple[int, ...], int] | None:
    """``PointSpec.fused`` for a ``Site.qkv``: where q, k or v lies in the fused output."""
    if qkv is None:
        return None
    layout, index = qkv
    d = hs.d_head
    if layout == "per_head":  # (head, [q k v], d_head): every head has its own key and value
        return hs.n_heads, (d, d, d), index
    if layout == "qkv":
        return 1, (hs.n_heads * d, hs.n_kv_heads * d, hs.n_kv_heads * d), index
    raise UsageError(f"unknown fused q/k/v layout {layout!r} (an adapter table is wrong)")


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
                                              *(f"layers.*.{s}" for s in _BLOCK_ORDER
                                                if s not in _OPTIONAL)))
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
        if suffix in _OPTIONAL:
            continue
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


#: TransformerLens (4.x) hook names -> canonical suffixes; every alias means exactly what the
#: TL hook means (checked against TransformerLens itself in tests/model/test_transformerlens.py)
_TL_BLOCK = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    # (not attn.hook_out / mlp.hook_out: in TL those are the sublayer's own output, before the
    # post-norm of Gemma 2/3 and OLMo 2, while hook_attn_out/hook_mlp_out are after it, as
    # cloche's attn.out and mlp.out are)
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    # TL's q/k/v are the projections' outputs: before any q/k norm and the rotary embedding,
    # grouped-query keys and values with n_kv_heads heads (not expanded)
    "attn.hook_q": "attn.q_proj",
    "attn.hook_k": "attn.k_proj",
    "attn.hook_v": "attn.v_proj",
    # after the rotary embedding: what attention uses (keys not expanded in TL either)
    "attn.hook_rot_q": "attn.q",
    "attn.hook_rot_k": "attn.k_grouped",
    "attn.hook_attn_scores": "attn.scores",
    "attn.hook_pattern": "attn.pattern",
    "attn.hook_z": "attn.z",
    "attn.hook_result": "attn.result",
    "mlp.hook_pre": "mlp.pre",
    "mlp.hook_pre_linear": "mlp.pre_linear",
    "mlp.hook_post": "mlp.post",
    # TL's hook_normalized is before the norm's weight (x / scale); hook_out is after it
    "ln1.hook_scale": "ln1.scale",
    "ln1.hook_normalized": "ln1.normalized",
    "ln1.hook_out": "ln1",
    "ln2.hook_scale": "ln2.scale",
    "ln2.hook_normalized": "ln2.normalized",
    "ln2.hook_out": "ln2",
}
_TL_GLOBAL = {
    "hook_embed": "embed",
    "hook_pos_embed": "pos_embed",
    "ln_final.hook_scale": "final_norm.scale",
    "ln_final.hook_normalized": "final_norm.normalized",
    "ln_final.hook_out": "final_norm",
}
_TL_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: why a TL name's canonical point can be absent although the model has attention/norms
_TL_WHY = {
    "attn.q_proj": "the query projection's output per head (before rotary and q/k norms)",
    "attn.k_proj": "the key projection's output per head (before rotary, kv heads)",
    "attn.v_proj": "the value projection's output per head (kv heads)",
    "attn.k_grouped": "the keys after rotary with grouped-query heads not expanded",
    "attn.scores": "the attention scores before the softmax",
    "attn.result": "the per-head attention outputs (z times each head's W_O)",
    "ln1.scale": "the norm's scale", "ln1.normalized": "the norm's input divided by its scale",
    "ln2.scale": "the norm's scale", "ln2.normalized": "the norm's input divided by its scale",
    "final_norm.scale": "the norm's scale",
    "final_norm.normalized": "the norm's input divided by its scale",
    "pos_embed": "the learned position embedding",
}


def tl_alias(name: str, model_type: str | None = None) -> str | None:
    """The canonical name a TransformerLens hook name stands for (None if it is not one), in a
    model of ``model_type`` (whose adapter may say that TL means something else there)."""
    adapter = adapter_for(model_type)
    if adapter is not None and name in adapter.tl_aliases:
        return adapter.tl_aliases[name]
    if name in _TL_GLOBAL:
        return _TL_GLOBAL[name]
    match = _TL_RE.match(name)
    if match and match.group(2) in _TL_BLOCK:
        return f"layers.{match.group(1)}.{_TL_BLOCK[match.group(2)]}"
    return None


def canonical_name(name: str, names: Collection[str], missing: Collection[str] = (),
                   model_type: str | None = None) -> str:
    """Resolve ``name`` (canonical, TransformerLens alias, or module point) to a canonical name.

    ``names`` are the model's point names (a set, or the specs dict keyed by name); ``missing``
    the canonical points it lacks and why (:func:`missing_points`), which errors then name;
    ``model_type`` picks the family's own TransformerLens aliases (``Adapter.tl_aliases``).
    """
    if name in names:
        return name
    resolved = tl_alias(name, model_type)
    if resolved is not None and resolved in names:
        return resolved
    why = _why_missing(resolved or name, missing)
    if why is not None:
        raise UnknownProbePoint(f"this model has no probe point {name!r}: {why}")
    suffix = re.sub(r"^layers\.\d+\.", "", resolved or "")
    if resolved is not None and suffix in _TL_WHY:
        layer = re.match(r"^layers\.(\d+)\.", resolved)
        in_range = layer is None or f"layers.{layer.group(1)}.resid_pre" in names
        if in_range:
            raise UnknownProbePoint(
                f"this model has no probe point {name!r}: TransformerLens' {name} is"
                f" {_TL_WHY[suffix]}, cloche's {resolved}, which this family's adapter does not"
                " offer (module:<path>:input|output points reach the modules)")
    if name.startswith("module:") and not name.endswith((":input", ":output")):
        hint = " (module points end in ':input' or ':output')"
    else:
        canonical = sorted(s for s in names if not s.startswith("module:"))
        close = difflib.get_close_matches(name, canonical, n=4, cutoff=0.6)
        hint = f"; did you mean one of {close}?" if close else ""
    raise UnknownProbePoint(f"unknown probe point {name!r}{hint}")
