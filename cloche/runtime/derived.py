"""Derived probe points: points computed from another point's value by an attached module.

A sparse dictionary attached at ``layers.3.resid_post`` under the name ``res3`` adds three
points: ``dict:res3:features`` (``encode(x)``), ``dict:res3:reconstruction``
(``decode(features)``) and ``dict:res3:error`` (``x - decode(encode(x))``). The runtime knows
nothing of dictionaries: any module with ``encode(x)``, ``decode(features, x)``, ``d_in`` and
``d_dict`` can be attached (``cloche.dictionaries`` makes them).

Derived points cost nothing until a probe names one. Then :meth:`DerivedPoints.expand` turns
the probes at a module's points into one probe at its base point, which computes the three
values, runs the probes on them in forward order, and — only if one of them replaced or edited
its value — hands the model ``reconstruction + error`` instead of ``x``. With no edit the model
runs on ``x`` itself, bit for bit. The error is fixed before the probes run (it is the
unedited reconstruction's), so editing features changes the run exactly by the change of the
reconstruction: the usual "SAE with error term" splice.

A transcoder reads one point and writes another (``out_base``, e.g. an MLP's input and its
output): its features are computed (and probed) at the first, its reconstruction and error —
``y - decode(encode(x))`` with ``y`` the second point's value — at the second, which is where
an edit takes effect. Both points must be run by the same rank.

Gradients (a backward run with gradient probes at a derived point): the features are a leaf
of their own, the error carries ``x``'s gradient, so the gradient reaching earlier layers is the
plain model's, and gradient probes at the features see d(objective)/d(features). The value the
model then gets is ``reconstruction + error``, equal to ``x`` up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from cloche.errors import ClocheError, UnknownProbePoint, UsageError
from cloche.model.points import ProbePoint, canonical_name
from cloche.probes.context import ProbeContext
from cloche.runtime.hooks import ProbeFn, ProbePlan, call_probes

__all__ = ["PARTS", "PREFIX", "Derived", "DerivedModule", "DerivedPoints", "is_derived",
           "make_derived"]

PREFIX = "dict:"
#: a derived module's points, in the order their probes run
PARTS = ("features", "reconstruction", "error")


class DerivedModule(Protocol):
    """What can be attached at a point: an encoder into features and a decoder back."""

    @property
    def d_in(self) -> int: ...

    @property
    def d_dict(self) -> int: ...

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor: ...


def is_derived(point: str) -> bool:
    return point.startswith(PREFIX)


@dataclass
class Derived:
    """One attached module: its name, its base point, its width and (where its base point's
    probes run) the module itself; ``None`` on the ranks of a sharded model that do not."""

    name: str
    base: str
    d_in: int
    d_dict: int
    module: DerivedModule | None
    summary: dict[str, Any]
    #: a transcoder's output point and width (None: it rewrites ``base``)
    out_base: str | None = None
    d_out: int | None = None

    def point(self, part: str) -> str:
        return f"{PREFIX}{self.name}:{part}"

    def points(self) -> list[str]:
        return [self.point(part) for part in PARTS]


class DerivedPoints:
    """The derived modules attached to one model (on one rank)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Derived] = {}

    def __bool__(self) -> bool:
        return bool(self._by_name)

    def attach(self, derived: Derived) -> None:
        self._by_name[derived.name] = derived  # a name attached again is replaced

    def detach(self, name: str) -> Derived:
        derived = self._by_name.pop(name, None)
        if derived is None:
            raise UsageError(f"no dictionary named {name!r} is attached"
                             f" (attached: {sorted(self._by_name) or 'none'})")
        return derived

    def get(self, name: str) -> Derived | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        """Every derived point name."""
        return [p for d in self._by_name.values() for p in d.points()]

    def summaries(self) -> dict[str, dict[str, Any]]:
        return {name: dict(d.summary) for name, d in self._by_name.items()}

    def split(self, point: str) -> tuple[Derived, str]:
        """The module and part a derived point name names."""
        _, name, part = [*point.split(":", 2), "", ""][:3]
        derived = self._by_name.get(name)
        if derived is None or part not in PARTS:
            known = self.names()
            hint = f" (attached: {known})" if known else " (no dictionary is attached)"
            raise UnknownProbePoint(f"unknown probe point {point!r}{hint}")
        return derived, part

    def named(self, name: str) -> Derived:
        """The module that ``dict:<name>:...`` (a point or a weight name) belongs to."""
        module = name.split(":", 2)[1] if is_derived(name) and name.count(":") >= 2 else ""
        derived = self._by_name.get(module)
        if derived is None:
            raise UsageError(f"no dictionary named {module!r} is attached"
                             f" (attached: {sorted(self._by_name) or 'none'})")
        return derived

    def weight(self, name: str) -> torch.Tensor:
        """An attached module's weight by ``dict:<name>:<weight>`` (``W_enc``, ``b_dec``, ...),
        read where the module lives: what an attribution graph needs of its encoder."""
        derived = self.named(name)
        attr = name.split(":", 2)[2]
        value = getattr(derived.module, attr, None) if derived.module is not None else None
        if derived.module is None:
            raise ClocheError(f"dictionary {derived.name!r} does not live on this rank")
        if not isinstance(value, torch.Tensor) or attr.startswith("_"):
            raise UsageError(f"dictionary {derived.name!r} has no weight {attr!r}")
        return value.detach()

    def base_of(self, point: str) -> str:
        """The point whose value a derived point is computed from."""
        return self.split(point)[0].base

    def probe_points(self, shapes: dict[str, tuple[str | int, ...] | None],
                     layer_of: Callable[[str], int | None]) -> list[ProbePoint]:
        """The derived points with their shapes (from their base point's)."""
        out = []
        for d in self._by_name.values():
            base = shapes.get(d.base)
            lead = None if base is None else _lead(base, d.d_in)
            for part in PARTS:
                width = d.d_dict if part == "features" else (d.d_out or d.d_in)
                shape = None if lead is None else (*lead, width)
                at = d.base if part == "features" else (d.out_base or d.base)
                out.append(ProbePoint(d.point(part), "dictionary", layer_of(at), shape))
        return out

    def expand(self, plan: ProbePlan) -> ProbePlan:
        """``plan`` with the probes at derived points folded into one probe per module at its
        base point (after the base point's own probes)."""
        if not any(is_derived(p) for p in plan.points()):
            return plan
        forward = {p: list(f) for p, f in plan.forward.items() if not is_derived(p)}
        backward = {p: list(f) for p, f in plan.backward.items() if not is_derived(p)}
        groups: dict[str, tuple[dict[str, list[ProbeFn]], dict[str, list[ProbeFn]]]] = {}
        for which, probes in ((0, plan.forward), (1, plan.backward)):
            for point, fns in probes.items():
                if is_derived(point):
                    derived, part = self.split(point)
                    groups.setdefault(derived.name, ({}, {}))[which][part] = list(fns)
        for name, (fwd, bwd) in groups.items():
            derived = self._by_name[name]
            probe = DerivedProbe(derived, fwd, bwd)
            if derived.out_base is None:
                forward.setdefault(derived.base, []).append(probe)
            else:
                forward.setdefault(derived.base, []).append(probe.read_input)
                forward.setdefault(derived.out_base, []).append(probe.write_output)
        return ProbePlan(forward, backward)


def _lead(shape: Iterable[str | int], d_in: int) -> tuple[str | int, ...] | None:
    """The leading dimensions of a base point's shape, seen as (..., d_in)."""
    dims = tuple(shape)
    if dims and dims[-1] == d_in:
        return dims[:-1]
    if len(dims) >= 2 and isinstance(dims[-1], int) and isinstance(dims[-2], int) \
            and dims[-1] * dims[-2] == d_in:  # per-head points (attn.z): heads flattened
        return dims[:-2]
    return None


class DerivedProbe:
    """The probe at a base point that runs the probes of one module's derived points."""

    def __init__(self, derived: Derived, forward: dict[str, list[ProbeFn]],
                 backward: dict[str, list[ProbeFn]]) -> None:
        self.derived = derived
        self.forward = forward
        self.backward = backward
        self.__qualname__ = f"dictionary {derived.name!r}"
        #: a transcoder's features, from its input point to its output point (this forward)
        self._pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool] | None = None

    def _probe(self, ctx: ProbeContext, part: str, value: torch.Tensor) -> tuple[torch.Tensor,
                                                                                  bool]:
        """Run the probes at ``part``; whether they replaced or edited ``value``."""
        fns = self.forward.get(part)
        out = value
        edited = False
        if fns:
            version = value._version
            out = call_probes(fns, ctx.at(self.derived.point(part)), value)
            edited = out is not value or value._version != version
        grads = self.backward.get(part)
        if grads and out.requires_grad:
            at = ctx.at(self.derived.point(part))
            out.register_hook(lambda g: call_probes(grads, at, g))
        return out, edited

    def _module(self, ctx: ProbeContext) -> DerivedModule:
        module = self.derived.module
        if module is None:
            raise ClocheError(f"dictionary {self.derived.name!r} is not on rank {ctx.rank},"
                              f" which runs {self.derived.base!r}")
        return module

    def _source(self, x: torch.Tensor, width: int, point: str) -> tuple[torch.Tensor, bool]:
        """``x`` as (..., width): per-head points come with their heads flattened."""
        flat = x.shape[-1] != width
        source = x.flatten(-2) if flat else x
        if source.shape[-1] != width:
            raise UsageError(f"dictionary {self.derived.name!r} expects {width} values per"
                             f" position at {point!r}, which has shape {tuple(x.shape)}")
        return source, flat

    def read_input(self, ctx: ProbeContext, x: torch.Tensor) -> None:
        """A transcoder's input point: compute and probe the features, keep them for the
        output point."""
        module = self._module(ctx)
        source, _ = self._source(x, self.derived.d_in, self.derived.base)
        watch = bool(self.backward) and torch.is_grad_enabled()
        with torch.no_grad():
            plain = source.detach()
            features = module.encode(plain)
        unedited = features.clone() if "features" in self.forward else features
        if watch:
            features.requires_grad_(True)
        features, edited = self._probe(ctx, "features", features)
        self._pending = (plain, unedited, features, edited)

    def write_output(self, ctx: ProbeContext, y: torch.Tensor) -> torch.Tensor | None:
        """A transcoder's output point: reconstruction and error, edits taking effect."""
        module = self._module(ctx)
        if self._pending is None:
            raise ClocheError(f"transcoder {self.derived.name!r} reached its output"
                              f" {self.derived.out_base!r} before its input {self.derived.base!r}")
        plain, clean_features, features, edited = self._pending
        self._pending = None
        width = self.derived.d_out or self.derived.d_in
        target, flat = self._source(y, width, self.derived.out_base or "")
        watch = bool(self.backward) and torch.is_grad_enabled()
        with torch.no_grad():
            clean = module.decode(clean_features, plain).to(y.dtype)
        out = self._splice(ctx, module, target, clean, features, plain, edited, watch)
        if out is None:
            return None
        return out.unflatten(-1, y.shape[-2:]) if flat else out

    def _splice(self, ctx: ProbeContext, module: DerivedModule, target: torch.Tensor,
                clean: torch.Tensor, features: torch.Tensor, plain: torch.Tensor,
                edited: bool, watch: bool) -> torch.Tensor | None:
        """Probe the reconstruction and error of ``target``; what the model then gets."""
        error = target - clean  # carries the target's gradient, if it has one
        if edited or watch:
            with torch.set_grad_enabled(watch):
                reconstruction = module.decode(features, plain).to(target.dtype)
        else:
            reconstruction = clean
        reconstruction, changed = self._probe(ctx, "reconstruction", reconstruction)
        edited = edited or changed
        error, changed = self._probe(ctx, "error", error)
        edited = edited or changed
        if not edited and not watch:
            return None  # the model's own value, bit for bit
        return reconstruction + error

    def __call__(self, ctx: ProbeContext, x: torch.Tensor) -> torch.Tensor | None:
        derived = self.derived
        module = self._module(ctx)
        source, flat = self._source(x, derived.d_in, derived.base)
        watch = bool(self.backward) and torch.is_grad_enabled()
        with torch.no_grad():
            plain = source.detach()
            features = module.encode(plain)
            clean = module.decode(features, plain).to(x.dtype)
        if watch:
            features.requires_grad_(True)
        features, edited = self._probe(ctx, "features", features)
        out = self._splice(ctx, module, source, clean, features, plain, edited, watch)
        if out is None:
            return None
        return out.unflatten(-1, x.shape[-2:]) if flat else out


def make_derived(name: str, point: str | None, module: Any, names: Iterable[str],
                 missing: Iterable[str], shapes: dict[str, tuple[str | int, ...] | None],
                 *, rank: int, device: torch.device | None, owned: bool = True,
                 out_point: str | None = None) -> Derived:
    """Check ``module`` against the point it is attached at and describe it.

    ``point`` ``None`` means the module's own ``hook_name`` (a TransformerLens name is
    resolved like any alias); ``owned`` False keeps only the description (a rank of a sharded
    model that does not run the point).
    """
    for attr in ("d_in", "d_dict", "encode", "decode"):
        if not hasattr(module, attr):
            raise UsageError(f"the module attached as {name!r} has no {attr!r}: a derived point"
                             " needs encode(x), decode(features, x), d_in and d_dict")
    if point is None:
        hook = getattr(module, "hook_name", None)
        if not isinstance(hook, str) or not hook:
            raise UsageError(f"dictionary {name!r} names no hook_name: pass point=...")
        point = hook
    known = frozenset(names)
    point = canonical_name(point, known, tuple(missing))
    if out_point is None:
        out_point = getattr(module, "hook_name_out", None) or None
    if out_point is not None:
        out_point = canonical_name(out_point, known, tuple(missing))
    for where in (point, out_point):
        if where is not None and is_derived(where):
            raise UsageError(f"a dictionary reads and writes model points, not another"
                             f" dictionary's {where!r}")
    d_in, d_dict = int(module.d_in), int(module.d_dict)
    d_out = int(getattr(module, "d_out", d_in))
    if out_point is None and d_out != d_in:
        raise UsageError(f"dictionary {name!r} writes {d_out} values, not the {d_in} it reads:"
                         " a transcoder needs the point it writes (out_point=...)")
    for where, width in ((point, d_in), (out_point, d_out)):
        shape = shapes.get(where) if where is not None else None
        if shape is not None and _lead(shape, width) is None:
            raise UsageError(f"dictionary {name!r} expects {width} values per position at"
                             f" {where!r}, which has shape {shape}")
    if owned and device is not None and isinstance(module, torch.nn.Module):
        module.to(device)
        module.requires_grad_(False)
    summary = {"name": name, "point": point, "out_point": out_point, "d_in": d_in,
               "d_dict": d_dict, "d_out": d_out, "rank": rank,
               "points": [f"{PREFIX}{name}:{part}" for part in PARTS]}
    describe = getattr(module, "summary", None)
    if callable(describe):
        summary.update({k: v for k, v in describe().items() if k not in summary})
    return Derived(name, point, d_in, d_dict, module if owned else None, summary,
                   out_base=out_point, d_out=d_out if out_point is not None else None)
