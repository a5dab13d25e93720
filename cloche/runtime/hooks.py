"""Attach probes to a Hugging Face model for one forward (and backward) pass, then detach.

Hooks are installed only where a probe is attached and only for the duration of a run; every
handle is removed in ``finally`` (also on error or cancellation), so the next plain run is the
plain model. Three kinds of site exist (see ``model.families.Site``): a module's output (forward
hook), a module's input (forward pre-hook) and an input that the model also keeps for a
residual add (``input_inplace``: a replacement is written into the tensor itself, so the
residual stream sees it too). A ``flat`` site's tensor is (batch * seq, width) inside the model;
probes see and return it as (batch, seq, width). Attention internals go through
``model.attention``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cloche.errors import Cancelled, ClocheError, ProbeError
from cloche.model import norms
from cloche.model.attention import attention_taps
from cloche.model.moe import expert_taps, reroute
from cloche.model.points import PointSpec
from cloche.probes.context import ProbeContext, RunInfo

ProbeFn = Callable[[ProbeContext, torch.Tensor], Any]


def _qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check_replacement(point: str, fn: Any, x: torch.Tensor, out: Any) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ProbeError(
            f"probe {_qualname(fn)} at {point!r} returned {type(out).__name__};"
            " a probe returns None (keep x) or a tensor of x's shape",
            point=point, probe=_qualname(fn),
        )
    if out.shape != x.shape:
        raise ProbeError(
            f"probe {_qualname(fn)} at {point!r} returned shape {tuple(out.shape)},"
            f" expected {tuple(x.shape)}",
            point=point, probe=_qualname(fn),
        )
    if out.dtype != x.dtype or out.device != x.device:
        out = out.to(device=x.device, dtype=x.dtype)
    return out


def call_probes(fns: Sequence[ProbeFn], ctx: ProbeContext, x: torch.Tensor) -> torch.Tensor:
    """Apply ``fns`` in order; each sees the previous one's result. Errors name the point."""
    for fn in fns:
        try:
            out = fn(ctx, x)
        except ClocheError:
            raise
        except Exception as exc:
            raise ProbeError(
                f"probe {_qualname(fn)} at {ctx.point!r} raised {type(exc).__name__}: {exc}",
                point=ctx.point, probe=_qualname(fn),
            ) from exc
        if out is not None:
            x = _check_replacement(ctx.point, fn, x, out)
    return x


@dataclass
class ProbePlan:
    """The probes of one run, by canonical point name."""

    forward: dict[str, list[ProbeFn]] = field(default_factory=dict)
    backward: dict[str, list[ProbeFn]] = field(default_factory=dict)

    def points(self) -> list[str]:
        return list(dict.fromkeys([*self.forward, *self.backward]))


def _first_tensor(value: Any) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], Any]]:
    """The tensor a point means inside a module's output, and how to put a replacement back."""
    if isinstance(value, torch.Tensor):
        return value, lambda new: new
    if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
        return value[0], lambda new: (new, *value[1:])
    if isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
        return value[0], lambda new: [new, *value[1:]]
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):  # a ModelOutput
        for key in list(value.keys()):
            item = value[key]
            if isinstance(item, torch.Tensor):
                def rebuild(new: torch.Tensor, key: str = key) -> Any:
                    value[key] = new
                    return value
                return item, rebuild
    return None, lambda new: new


class Attachment:
    """Installs the hooks of one plan on one model; ``detach`` removes them all."""

    def __init__(self, hf_model: nn.Module, modules: dict[str, nn.Module],
                 specs: dict[str, PointSpec], plan: ProbePlan, run: Callable[[], RunInfo],
                 cancel: Any = None, block_paths: Sequence[str] = (),
                 attention_paths: dict[str, int] | None = None,
                 attention_method: str | Callable[..., Any] | None = None) -> None:
        self._model = hf_model
        self._specs = specs
        self._plan = plan
        self._run = run
        self._cancel = cancel
        self._modules = modules
        self._handles: list[Any] = []
        self._block_paths = block_paths
        self._attention_paths = attention_paths or {}
        self._attention_method = attention_method
        self._lead: dict[int, tuple[int, ...]] = {}  # layer -> (batch, seq) of its input

    def _ctx(self, name: str) -> ProbeContext:
        spec = self._specs[name]
        return ProbeContext(self._run(), name, spec.layer)

    def _apply(self, name: str, x: torch.Tensor, *, grads: bool = True) -> torch.Tensor:
        fns = self._plan.forward.get(name)
        if fns:
            x = call_probes(fns, self._ctx(name), x)
        if grads:
            self._watch_grad(name, x)
        return x

    def _watch_grad(self, name: str, x: torch.Tensor, lead: tuple[int, ...] | None = None
                    ) -> None:
        fns = self._plan.backward.get(name)
        if fns and x.requires_grad:
            if lead is None:
                x.register_hook(lambda g: call_probes(fns, self._ctx(name), g))
            else:
                x.register_hook(lambda g: call_probes(
                    fns, self._ctx(name), g.view(*lead, g.shape[-1])).reshape(g.shape))

    def _flat_lead(self, name: str) -> tuple[int, ...] | None:
        """(batch, seq) for a point whose tensor the model flattens; None for the others."""
        spec = self._specs[name]
        if spec.site is None or not spec.site.flat or spec.layer is None:
            return None
        return self._lead.get(spec.layer)

    def _apply_site(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``_apply`` at a module site: flat tensors are shown as (batch, seq, width), a
        per-head point's last dimension as (head, d_head)."""
        heads = self._specs[name].heads
        if heads is not None:
            view = x.unflatten(-1, (heads, x.shape[-1] // heads))
            y = self._apply(name, view, grads=False)
            fns = self._plan.backward.get(name)
            if fns and x.requires_grad:
                x.register_hook(lambda g: call_probes(
                    fns, self._ctx(name), g.unflatten(-1, (heads, -1))).flatten(-2))
            return x if y is view else y.flatten(-2)
        lead = self._flat_lead(name)
        if lead is None:
            return self._apply(name, x)
        view = x.view(*lead, x.shape[-1])
        y = self._apply(name, view, grads=False)
        self._watch_grad(name, x, lead)
        return x if y is view else y.reshape(x.shape)

    def _output_hook(self, name: str) -> Callable[..., Any]:
        site = self._specs[name].site
        part = site.part if site is not None else None
        router = self._specs[name].kind == "router"
        mutated = site is not None and site.mutated
        fused = self._specs[name].fused

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            x, rebuild = _first_tensor(output)
            if x is None:
                return None
            if fused is not None:  # q, k or v of a fused projection: edit it, put it back
                groups, sizes, index = fused
                pieces = list(x.unflatten(-1, (groups, -1)).split(sizes, dim=-1))
                piece = pieces[index].flatten(-2)
                y = self._apply_site(name, piece)
                if y is piece and name not in self._plan.backward:
                    return None
                pieces[index] = y.unflatten(-1, (groups, -1))
                return rebuild(torch.cat(pieces, dim=-1).flatten(-2))
            if part is not None:  # one chunk of a fused output: edit it, put it back whole
                pieces = list(x.chunk(part[1], dim=-1))
                piece = pieces[part[0]]
                y = self._apply_site(name, piece)
                if y is piece and name not in self._plan.backward:
                    return None  # (a gradient probe needs the model to use the watched piece)
                pieces[part[0]] = y
                return rebuild(torch.cat(pieces, dim=-1))
            if mutated:  # the model edits x in place later: probes must not keep x itself
                copy = x.clone()
                version = copy._version
                y = self._apply_site(name, copy)
                if (y is copy and copy._version == version
                        and name not in self._plan.backward):  # (gradients flow through copy)
                    return None
                return rebuild(y.clone())
            y = self._apply_site(name, x)
            if y is x:
                return None
            if router:  # new router logits decide which experts run
                return reroute(module, y)
            return rebuild(y)
        return hook

    def _norm_hook(self, names: dict[str, str]) -> Callable[..., Any]:
        """``ln*.scale`` / ``ln*.normalized`` (part -> point name) of one norm module."""
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            y, rebuild = _first_tensor(output)
            kind = norms.norm_kind(module)
            if y is None or kind is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            centred, scale = norms.split(kind, args[0])
            # _apply_site: a norm the model runs on flattened tokens (OPT's ln2) is shown as
            # (batch, seq, width), like every other point
            new_scale = self._apply_site(names["scale"], scale) if "scale" in names else scale
            normalized = centred / new_scale
            new = (self._apply_site(names["normalized"], normalized) if "normalized" in names
                   else normalized)
            if (new_scale is scale and new is normalized
                    and not any(n in self._plan.backward for n in names.values())):
                return None  # the model's own output, bit for bit
            return rebuild(norms.recombine(kind, module, new, y.dtype))
        return hook

    def _result_hook(self, name: str) -> Callable[..., Any]:
        """``attn.result``: the output projection's input z, per head, times W_O."""
        result = self._specs[name].result
        assert result is not None
        n_heads, layout = result

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            y, rebuild = _first_tensor(output)
            if y is None or not args or not isinstance(args[0], torch.Tensor):
                return None
            z = args[0].unflatten(-1, (n_heads, -1))
            # Linear: (d_model, heads*d_head); Conv1D: (heads*d_head, d_model)
            weight: torch.Tensor = module.weight  # type: ignore[assignment]
            w = (weight.T if layout == "linear" else weight).unflatten(0, (n_heads, -1))
            per_head = torch.einsum("...hd,hdm->...hm", z, w.to(z.dtype))
            new = self._apply(name, per_head)
            if new is per_head and name not in self._plan.backward:
                return None
            out = new.sum(-2)
            bias = getattr(module, "bias", None)
            if isinstance(bias, torch.Tensor):
                out = out + bias
            return rebuild(out.to(y.dtype))
        return hook

    def _lead_hook(self, layer: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor):
                self._lead[layer] = tuple(hidden.shape[:-1])
        return hook

    def _input_hook(self, name: str, inplace: bool) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args and isinstance(args[0], torch.Tensor):
                x = args[0]
            else:
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                if key is None:
                    return None
                x = kwargs[key]
            if inplace:
                # probes see a copy, so what they save does not change when we write into x
                lead = self._flat_lead(name)
                if self._plan.forward.get(name):
                    copy = x.clone() if lead is None else x.view(*lead, x.shape[-1]).clone()
                    version = copy._version
                    y = self._apply(name, copy, grads=False)
                    if y is not copy or copy._version != version:  # replaced or edited in place
                        x.copy_(y.reshape(x.shape))
                self._watch_grad(name, x, lead)
                return None
            y = self._apply_site(name, x)
            if y is x:
                return None
            if args and args[0] is x:
                return (y, *args[1:]), kwargs
            return args, {**kwargs, key: y}
        return hook

    def _attention_apply(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        name = f"layers.{layer}.attn.{which}"
        if name in self._plan.forward or name in self._plan.backward:
            return self._apply(name, x)
        return x

    def _expert_apply(self, layer: int, expert: int, x: torch.Tensor) -> torch.Tensor:
        name = f"layers.{layer}.mlp.experts.{expert}.post"
        if name in self._plan.forward or name in self._plan.backward:
            return self._apply_site(name, x)
        return x

    def _probed(self, layer: int, which: str) -> bool:
        name = f"layers.{layer}.attn.{which}"
        return name in self._plan.forward or name in self._plan.backward

    def _needs_pattern(self, layer: int) -> bool:
        return self._probed(layer, "pattern") or self._probed(layer, "scores")

    def _cancel_hook(self, module: nn.Module, args: Any) -> None:
        if self._cancel is not None and self._cancel.is_set():
            raise Cancelled("the request was cancelled")

    @contextlib.contextmanager
    def attached(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.callback(self.detach)
            uses_attention = False
            flat_layers: set[int] = set()
            experts: dict[int, nn.Module] = {}
            norm_points: dict[str, dict[str, str]] = {}  # module -> part -> point
            for name in self._plan.points():
                spec = self._specs[name]
                if spec.attention is not None:
                    uses_attention = True
                    continue
                if spec.norm is not None and spec.site is not None:
                    norm_points.setdefault(spec.site.module, {})[spec.norm] = name
                    continue
                if spec.result is not None and spec.site is not None:
                    module = self._modules[spec.site.module]
                    self._handles.append(module.register_forward_hook(self._result_hook(name)))
                    continue
                site = spec.site
                if site is None:  # build_specs gives every other point a module site
                    raise ClocheError(f"probe point {name!r} has no module to hook")
                module = self._modules[site.module]
                if site.flat and spec.layer is not None and spec.layer not in flat_layers:
                    flat_layers.add(spec.layer)
                    block = self._modules[self._block_paths[spec.layer]]
                    self._handles.append(block.register_forward_pre_hook(
                        self._lead_hook(spec.layer), with_kwargs=True))
                if spec.expert is not None and spec.layer is not None:
                    experts[spec.layer] = module
                    continue
                if site.where == "output":
                    self._handles.append(module.register_forward_hook(self._output_hook(name)))
                else:
                    hook = self._input_hook(name, site.where == "input_inplace")
                    self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            for path, names in norm_points.items():  # before the norm's output probes
                self._handles.append(self._modules[path].register_forward_hook(
                    self._norm_hook(names), prepend=True))
            if self._cancel is not None:
                for path in self._block_paths:
                    handle = self._modules[path].register_forward_pre_hook(self._cancel_hook)
                    self._handles.append(handle)
            if experts:
                stack.enter_context(expert_taps(experts, self._expert_apply))
            if uses_attention:
                layer_of = {id(self._modules[p]): i for p, i in self._attention_paths.items()}
                method = None
                if self._attention_method is not None:
                    method = (self._attention_method,
                              {i: self._modules[p] for p, i in self._attention_paths.items()})
                stack.enter_context(attention_taps(self._model, layer_of, self._attention_apply,
                                                   self._needs_pattern, method, self._probed))
            yield

    def detach(self) -> None:
        """Remove every hook, even if an exception (a cancel delivered into this thread at a
        bytecode boundary) interrupts one removal: the next run must see the plain model."""
        failure: BaseException | None = None
        while self._handles:
            handle = self._handles.pop()
            try:
                handle.remove()
            except BaseException as exc:  # noqa: BLE001 - finish detaching, then re-raise
                failure = failure or exc
                handle.remove()
        if failure is not None:
            raise failure
