"""The parity battery on one model in this process, against plain transformers.

Each check compares what cloche's probe points hold with what transformers itself reports for
the same weights and inputs (the relations ``tests/model/test_families.py`` asserts for every
family), and gives one :class:`~cloche.check.report.Row`:

- a run without probes is bit-equal to the plain transformers forward;
- ``resid_pre``/``resid_post``/``final_norm``/``logits`` equal ``output_hidden_states`` and
  the logits; with the attention internals tapped (cloche's eager attention) they equal
  transformers' eager forward, and ``attn.pattern`` equals its ``output_attentions``;
- the residual stream decomposes as the names promise (``resid_mid = resid_pre + attn.out``,
  ``resid_post = resid_mid + mlp.out``; parallel blocks ``resid_pre + attn.out + mlp.out``),
  and ``attn.z`` through ``W_O`` gives ``attn.out``;
- every canonical point is captured with the shape the catalog states, and finite;
- zeroing a neuron (a head) at its probe point equals zeroing its output weights;
- gradient probes equal autograd (causal models with a head);
- TransformerLens aliases name the points they stand for.

A check the model cannot have is a SKIP with the reason (``model.info()["missing"]``); a check
that raises is a FAIL naming the error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cloche.check.compare import capture, compare, max_diff
from cloche.check.report import FAIL, PASS, SKIP, Row, summarize_points
from cloche.errors import UnknownProbePoint
from cloche.model import load_hf

__all__ = ["battery", "canonical_points", "known_pattern_divergence"]

Progress = Callable[[str], None]

ATTENTION_INTERNALS = ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z")

#: TransformerLens hook names whose meaning is the canonical point's, on every family
TL_ALIASES = {
    "hook_resid_pre": "resid_pre", "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post", "hook_attn_out": "attn.out", "hook_mlp_out": "mlp.out",
    "attn.hook_pattern": "attn.pattern", "attn.hook_z": "attn.z", "mlp.hook_pre": "mlp.pre",
    "mlp.hook_post": "mlp.post",
}


def known_pattern_divergence(config: Any) -> str | None:
    """Why transformers' eager ``output_attentions`` is not the model's attention, if so."""
    if getattr(config, "model_type", None) == "falcon" and getattr(config, "alibi", False):
        return ("transformers' eager Falcon ALiBi branch adds ALiBi twice; cloche's pattern is"
                " the attention the default (sdpa) forward computes")
    return None


def canonical_points(model: Any) -> list[str]:
    """Every canonical probe point of ``model`` (no ``module:`` points), in forward order."""
    return [p.name for p in model.probe_points() if not p.name.startswith("module:")]


def _missing(info: dict[str, Any], name: str) -> str:
    """The model's own statement of why it lacks ``name`` (or a plain one)."""
    parts = name.split(".")
    pattern = ".".join(["layers", "*", *parts[2:]]) if parts[0] == "layers" else name
    for line in info.get("missing", []):
        point, _, why = line.partition(": ")
        if point == pattern:
            return f"{pattern}: {why}"
    return f"the model has no {pattern} point"


def _skip(check: str, reason: str, points: str = "") -> Row:
    return Row(check=check, points=points, status=SKIP, reason=reason)


def _last_output(names: list[str], n_layers: int) -> str:
    for name in ("logits", "final_norm", f"layers.{n_layers - 1}.resid_post"):
        if name in names:
            return name
    raise UnknownProbePoint("the model has neither logits, final_norm nor a last resid_post")


class _Battery:
    def __init__(self, model: Any, reference: nn.Module, ids: torch.Tensor,
                 eager: Callable[[], nn.Module]) -> None:
        self.model, self.reference, self.ids = model, reference, ids
        self._eager_factory = eager
        self.info = model.info()
        self.n = int(self.info["n_layers"])
        self.names = canonical_points(model)
        self.stream_names = [n for n in self.names
                             if not any(n.endswith(s) for s in ATTENTION_INTERNALS)]
        self.adapter = getattr(model.executor, "adapter", None)
        with torch.no_grad():
            self.ref = reference(ids, output_hidden_states=True)
        self._eager_out: Any = None
        self._stream: dict[str, torch.Tensor] | None = None
        self._tapped: dict[str, torch.Tensor] | None = None

    # --------------------------------------------------------------- shared runs
    @property
    def eager_out(self) -> Any:
        if self._eager_out is None:
            config: Any = getattr(self.reference, "config", None)
            before = getattr(config, "_attn_implementation", None)
            eager = self._eager_factory()
            try:
                with torch.no_grad():
                    self._eager_out = eager(self.ids, output_hidden_states=True,
                                            output_attentions=True)
            finally:
                if eager is self.reference and before not in (None, "eager"):
                    self.reference.set_attn_implementation(before)  # type: ignore[operator]
        return self._eager_out

    @property
    def stream(self) -> dict[str, torch.Tensor]:
        """Every canonical point but the attention internals (the model's own attention)."""
        if self._stream is None:
            self._stream = capture(self.model, self.ids, self.stream_names)
        return self._stream

    @property
    def tapped(self) -> dict[str, torch.Tensor]:
        """Every canonical point, attention internals included (cloche's eager attention),
        and the inputs of the norms that make ``attn.out`` where a norm does."""
        if self._tapped is None:
            extra = [path for _, path in self._attn_out_sources()
                     if path not in self.names]
            self._tapped = capture(self.model, self.ids, [*self.names, *extra])
        return self._tapped

    def _attn_out_sources(self) -> list[tuple[int, str]]:
        """(layer, point) that ``z · W_O + b_O`` makes: ``attn.out``, or the input of the norm
        that makes it (Gemma 2/3's post-attention norm)."""
        adapter = self.adapter
        site = adapter.block_sites.get("attn.out") if adapter is not None else None
        if isinstance(site, tuple):
            site = site[0] if site else None
        out = []
        for i in range(self.n):
            if f"layers.{i}.attn.z" not in self.names:
                continue
            if adapter is not None and site is not None and "norm" in site.module:
                out.append((i, f"module:{adapter.layers}.{i}.{site.module}:input"))
            else:
                out.append((i, f"layers.{i}.attn.out"))
        return out

    def _resid_mid_modules(self) -> dict[str, str]:
        """``layers.i.resid_mid`` -> the module whose input it is (where the adapter says so),
        for the reference's autograd."""
        adapter = self.adapter
        site = adapter.block_sites.get("resid_mid") if adapter is not None else None
        if isinstance(site, tuple):
            site = site[0] if site else None
        if adapter is None or site is None or not site.where.startswith("input"):
            return {}
        modules = dict(self.reference.named_modules())
        out = {}
        for i in range(self.n):
            path = ".".join(p for p in (adapter.layers, str(i), site.module) if p)
            if f"layers.{i}.resid_mid" in self.names and path in modules:
                out[f"layers.{i}.resid_mid"] = path
        return out

    # --------------------------------------------------------------- the checks
    def no_probe_run(self) -> Iterator[Row]:
        check = "no-probe run == transformers"
        if not self.info["lm_head"]:
            yield _skip(check, "saved without a language-model head: no logits to compare")
            return
        result = self.model.run(self.ids)
        yield compare(check, [("logits", result.logits, self.ref.logits)], exact=True,
                      points="logits (bit-equal)")
        if self.info["causal"]:
            vocab = self.ref.logits.shape[-1]
            want = nn.functional.cross_entropy(self.ref.logits[:, :-1].reshape(-1, vocab).float(),
                                               self.ids[:, 1:].reshape(-1))
            yield compare("next-token loss == cross-entropy of transformers' logits",
                          [("loss", torch.tensor(float(result.loss)), want)], atol=0, rtol=1e-6,
                          points="loss")

    def _stream_pairs(self, got: dict[str, torch.Tensor], hidden: Any, logits: Any
                      ) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        pairs = []
        for i in range(self.n):
            pairs.append((f"layers.{i}.resid_pre", got[f"layers.{i}.resid_pre"], hidden[i]))
            if i < self.n - 1:
                pairs.append((f"layers.{i}.resid_post", got[f"layers.{i}.resid_post"],
                              hidden[i + 1]))
        last = "final_norm" if "final_norm" in got else f"layers.{self.n - 1}.resid_post"
        pairs.append((last, got[last], hidden[self.n]))
        if "logits" in got and logits is not None:
            pairs.append(("logits", got["logits"], logits))
        return pairs

    def hidden_states(self) -> Iterator[Row]:
        yield compare("residual stream == output_hidden_states",
                      self._stream_pairs(self.stream, self.ref.hidden_states,
                                         getattr(self.ref, "logits", None)))

    def eager_attention(self) -> Iterator[Row]:
        names = [f"layers.{i}.attn.pattern" for i in range(self.n)]
        if not all(n in self.names for n in names):
            reason = _missing(self.info, next(n for n in names if n not in self.names))
            yield _skip("attn.pattern == output_attentions (eager)", reason,
                        "layers.*.attn.pattern")
            yield _skip("stream with attention tapped == eager transformers", reason)
            return
        divergence = known_pattern_divergence(self.model.config)
        if divergence:
            yield _skip("attn.pattern == output_attentions (eager)", divergence,
                        "layers.*.attn.pattern")
            yield compare("stream with attention tapped == transformers",
                          self._stream_pairs(self.tapped, self.ref.hidden_states,
                                             getattr(self.ref, "logits", None)))
            return
        eager = self.eager_out
        yield compare("attn.pattern == output_attentions (eager)",
                      [(n, self.tapped[n], eager.attentions[i]) for i, n in enumerate(names)])
        yield compare("stream with attention tapped == eager transformers",
                      self._stream_pairs(self.tapped, eager.hidden_states,
                                         getattr(eager, "logits", None)))

    def decomposition(self) -> Iterator[Row]:
        check = "resid_post == resid_pre + attn.out + mlp.out"
        got = self.stream
        parts = ("resid_pre", "attn.out", "mlp.out", "resid_post")
        lacking = [f"layers.0.{p}" for p in parts if f"layers.0.{p}" not in got]
        if lacking:
            yield _skip(check, _missing(self.info, lacking[0]))
            return
        if not self.info["causal"]:
            yield _skip(check, "encoder blocks (post-norm) normalise after each residual add")
            return
        pairs = []
        for i in range(self.n):
            p = {s: got[f"layers.{i}.{s}"] for s in parts}
            if f"layers.{i}.resid_mid" in got:
                mid = got[f"layers.{i}.resid_mid"]
                pairs.append((f"layers.{i}.resid_mid", mid, p["resid_pre"] + p["attn.out"]))
                pairs.append((f"layers.{i}.resid_post", p["resid_post"], mid + p["mlp.out"]))
            else:
                pairs.append((f"layers.{i}.resid_post", p["resid_post"],
                              p["resid_pre"] + p["attn.out"] + p["mlp.out"]))
        names = [n for n, _, _ in pairs]
        yield compare(check if self.info["parallel"] else
                      "resid_mid, resid_post == sums of their parts",
                      pairs, points=summarize_points(names))

    def z_through_w_o(self) -> Iterator[Row]:
        check = "attn.z . W_O + b_O == attn.out"
        sources = self._attn_out_sources()
        if not sources:
            yield _skip(check, _missing(self.info, "layers.0.attn.z"))
            return
        pairs = []
        for i, source in sources:
            out = torch.einsum("bshd,hdm->bsm", self.tapped[f"layers.{i}.attn.z"],
                               self.model.param(f"layers.{i}.attn.W_O"))
            try:
                out = out + self.model.param(f"layers.{i}.attn.b_O")
            except UnknownProbePoint:  # no output bias in this family
                pass
            pairs.append((source, out, self.tapped[source]))
        yield compare(check, pairs, points=f"layers.*.attn.z ({len(pairs)})")

    def every_point(self) -> Iterator[Row]:
        check = "every canonical point: catalog shape, finite (scores: -inf where masked)"
        batch, seq = self.ids.shape
        shapes = {p.name: p.shape for p in self.model.probe_points()}
        bad = []
        for name in self.names:
            value = self.tapped[name]
            shape = shapes.get(name)
            if shape is not None:
                want = tuple(batch if d == "batch" else seq if d == "seq" else d for d in shape)
                if all(isinstance(d, int) for d in want) and tuple(value.shape) != want:
                    bad.append(f"{name} is {tuple(value.shape)}, the catalog says {shape}")
                    continue
            if not value.is_floating_point():
                continue
            if name.endswith(".attn.scores"):  # masked entries are -inf by definition (as in TL)
                if bool(torch.isnan(value).any() or (value == float("inf")).any()):
                    bad.append(f"{name} holds nan or +inf")
            elif not bool(torch.isfinite(value).all()):
                bad.append(f"{name} holds inf or nan")
        yield Row(check=check, points=f"all {len(self.names)} canonical points",
                  n_points=len(self.names), status=FAIL if bad else PASS, reason="; ".join(bad[:3]))

    def _edit_row(self, check: str, point: str, select: Callable[[torch.Tensor], Any],
                  weight: torch.Tensor, weight_index: Any, what: str) -> Row:
        """Zeroing ``select`` of ``point`` by a probe == zeroing ``weight[weight_index]``."""
        final = _last_output(self.names, self.n)

        def zero(ctx: Any, x: torch.Tensor) -> torch.Tensor:
            x = x.clone()
            x[select(x)] = 0
            return x

        baseline = capture(self.model, self.ids, [final])[final]
        ablated = capture(self.model, self.ids, [final], probes={point: zero})[final]
        with torch.no_grad():
            saved = weight[weight_index].clone()
            weight[weight_index] = 0
        try:
            edited = capture(self.model, self.ids, [final])[final]
        finally:
            with torch.no_grad():
                weight[weight_index] = saved
        row = compare(check, [(final, ablated, edited)], points=f"{point} ({what})")
        if row.status == PASS and max_diff(ablated, baseline) == 0:
            return Row(**{**row.__dict__, "status": FAIL,
                          "reason": f"zeroing {what} changed nothing: {point} does not reach"
                                    f" {final}"})
        return row

    def neuron_ablation(self) -> Iterator[Row]:
        layer = self.n - 1
        point = f"layers.{layer}.mlp.post"
        if point in self.stream:
            check = "neuron ablation == W_out edit"
            post = self.stream[point]
            w_out = self.model.param(f"layers.{layer}.mlp.W_out")
            if w_out.shape[0] != post.shape[-1]:
                yield Row(check=check, points=point, status=FAIL, reason=(
                    f"layers.{layer}.mlp.W_out is {tuple(w_out.shape)}: its rows should be the"
                    f" {post.shape[-1]} neurons of {point}"))
                return
            j = int(post.abs().float().mean(dim=(0, 1)).argmax())
            yield self._edit_row(check, point, lambda x: (..., j), w_out, j, f"neuron {j}")
            return
        routed = [i for i in range(self.n) if f"layers.{i}.mlp.experts.0.post" in self.stream]
        if not routed:
            yield _skip("neuron ablation == W_out edit", _missing(self.info, point), point)
            return
        check = "expert neuron ablation == expert W_out edit"
        layer = routed[-1]
        prefix = f"layers.{layer}.mlp.experts."
        posts = {int(name[len(prefix):].split(".")[0]): value
                 for name, value in self.stream.items() if name.startswith(prefix)}
        e, j = max(((e, int(p.abs().float().mean(dim=(0, 1)).argmax())) for e, p in posts.items()),
                   key=lambda ej: float(posts[ej[0]][..., ej[1]].abs().float().mean()))
        point = f"layers.{layer}.mlp.experts.{e}.post"
        weight = f"layers.{layer}.mlp.experts.{e}.W_out"
        if weight not in self.model.param_names():
            yield _skip(check, f"this model has no canonical {weight} to edit", point)
            return
        # (d_expert, d_model): a view of the stacked down_proj, so the edit reaches the model
        yield self._edit_row(check, point, lambda x: (..., j), self.model.param(weight), j,
                             f"expert {e} neuron {j}")

    def head_ablation(self) -> Iterator[Row]:
        check = "head ablation == W_O edit"
        layer = self.n - 1
        point = f"layers.{layer}.attn.z"
        if point not in self.tapped:
            yield _skip(check, _missing(self.info, point), point)
            return
        z = self.tapped[point]
        w_o = self.model.param(f"layers.{layer}.attn.W_O")
        if tuple(w_o.shape[:2]) != tuple(z.shape[2:]):
            yield Row(check=check, points=point, status=FAIL, reason=(
                f"layers.{layer}.attn.W_O is {tuple(w_o.shape)}: it should start with the"
                f" (heads, d_head) = {tuple(z.shape[2:])} of {point}"))
            return
        h = int(z.float().norm(dim=-1).mean(dim=(0, 1)).argmax())
        yield self._edit_row(check, point, lambda x: (slice(None), slice(None), h), w_o, h,
                             f"head {h}")

    def gradients(self) -> Iterator[Row]:
        check = "gradient probes == autograd"
        if not self.info["causal"]:
            yield _skip(check, "not a causal model: no next-token loss to backprop")
            return
        if not self.info["lm_head"]:
            yield _skip(check, "saved without a language-model head: no loss to backprop")
            return
        names = [f"layers.{i}.resid_pre" for i in range(self.n)]
        mids = self._resid_mid_modules()
        names += list(mids)
        context = "cloche-check-grads"
        handle = self.model.save_context(context)
        handle.clear()
        self.model.run(self.ids, grad_probes=dict.fromkeys(names, _saver), backward=True,
                       save=context)
        try:
            got = {n: handle.fetch(n)[0] for n in names}
        finally:
            handle.clear()
        reference = self.reference
        reference.zero_grad(set_to_none=True)
        modules = dict(reference.named_modules())
        seen: dict[str, torch.Tensor] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                seen.setdefault(name, args[0] if args else kwargs["hidden_states"])
            return hook

        hooks = [modules[path].register_forward_pre_hook(keep(name), with_kwargs=True)
                 for name, path in mids.items()]
        try:
            out = reference(self.ids, output_hidden_states=True)
        finally:
            for hook in hooks:
                hook.remove()
        vocab = out.logits.shape[-1]
        loss = nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, vocab).float(),
                                           self.ids[:, 1:].reshape(-1))
        wrt = [*out.hidden_states[: self.n], *(seen[n] for n in mids)]
        want = torch.autograd.grad(loss, wrt, retain_graph=True)
        # (OPT's MLP sees (batch * seq, d): the reference is compared in the point's shape)
        yield compare(check, [(n, got[n], w.reshape(got[n].shape) if w.numel() == got[n].numel()
                               else w) for n, w in zip(names, want, strict=True)],
                      atol=1e-6, rtol=1e-5)
        loss.backward()
        params = [(n, p.grad) for n, p in reference.named_parameters() if p.grad is not None]
        step = max(1, len(params) // 8)
        chosen = params[::step][:8]
        yield compare("parameter gradients == autograd",
                      [(n, self.model.param(n, grad=True), g) for n, g in chosen],
                      atol=1e-6, rtol=1e-5, points=f"{len(chosen)} of {len(params)} weights")
        reference.zero_grad(set_to_none=True)

    def aliases(self) -> Iterator[Row]:
        check = "TransformerLens aliases name their points"
        wrong, used = [], {}
        for i in range(self.n):
            for alias, suffix in TL_ALIASES.items():
                name, canonical = f"blocks.{i}.{alias}", f"layers.{i}.{suffix}"
                try:
                    resolved = self.model.resolve(name)
                except UnknownProbePoint:
                    if canonical in self.names:
                        wrong.append(f"{name} is refused, but {canonical} exists")
                    continue
                if resolved != canonical:
                    wrong.append(f"{name} resolves to {resolved}, not {canonical}")
                else:
                    used[name] = canonical
        if wrong:
            yield Row(check=check, points=f"{len(used) + len(wrong)} aliases",
                      n_points=len(used) + len(wrong), status=FAIL, reason="; ".join(wrong[:3]))
            return
        # the aliases work in probes: what a probe sees there is the canonical point's tensor
        context = "cloche-check-aliases"
        handle = self.model.save_context(context)
        handle.clear()
        probes: dict[str, list[Callable[..., None]]] = {}
        for alias, canonical in used.items():
            probes.setdefault(canonical, []).append(_saver)
            probes.setdefault(alias, []).append(lambda c, x, key=alias: c.save(key, x))
        try:
            self.model.run(self.ids, probes=probes, save=context)
            got = {key: handle.fetch(key)[0] for key in [*used, *set(used.values())]}
        finally:
            handle.clear()
        kinds = sorted({alias.split(".", 2)[2] for alias in used})
        yield compare(check, [(a, got[a], got[c]) for a, c in used.items()], exact=True,
                      points=f"{len(used)} aliases ({len(kinds)} kinds)")


def _saver(ctx: Any, x: torch.Tensor) -> None:
    ctx.save(ctx.point, x)


def battery(model: Any, reference: nn.Module, ids: torch.Tensor, *,
            eager: Callable[[], nn.Module] | None = None,
            progress: Progress | None = None) -> list[Row]:
    """Every check on ``model`` (a cloche model in this process) against ``reference`` (the
    same checkpoint loaded with plain transformers), run on token ids ``ids``.

    ``eager`` gives the reference with ``attn_implementation="eager"`` (for
    ``output_attentions``); by default the reference is switched to it and back.
    """
    battery = _Battery(model, reference, ids, eager or _switch_to_eager(reference))
    steps: list[tuple[str, Callable[[], Iterator[Row]]]] = [
        ("no-probe run == transformers", battery.no_probe_run),
        ("residual stream == output_hidden_states", battery.hidden_states),
        ("attn.pattern == output_attentions (eager)", battery.eager_attention),
        ("residual decomposition", battery.decomposition),
        ("attn.z . W_O + b_O == attn.out", battery.z_through_w_o),
        ("every canonical point: catalog shape, finite", battery.every_point),
        ("neuron ablation == W_out edit", battery.neuron_ablation),
        ("head ablation == W_O edit", battery.head_ablation),
        ("gradient probes == autograd", battery.gradients),
        ("TransformerLens aliases name their points", battery.aliases),
    ]
    rows: list[Row] = []
    for label, step in steps:
        if progress is not None:
            progress(f"checking {label}")
        rows.extend(guarded(label, step))
    return rows


def guarded(label: str, step: Callable[[], Iterator[Row]]) -> list[Row]:
    """The rows of ``step``; an error becomes a FAIL row that names it."""
    rows: list[Row] = []
    try:
        rows.extend(step())
    except Exception as exc:  # noqa: BLE001 - a check that cannot run is a failed check
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        rows.append(Row(check=label, status=FAIL,
                        reason=f"raised {type(exc).__name__}: {message}"))
    return rows


def _switch_to_eager(reference: nn.Module) -> Callable[[], nn.Module]:
    """The reference in eager attention: switched in place where transformers can (the
    battery switches it back), else loaded again from the same files."""

    def eager() -> nn.Module:
        config: Any = getattr(reference, "config", None)
        can_switch = getattr(reference, "_can_set_attn_implementation", None)
        if callable(can_switch) and can_switch():
            reference.set_attn_implementation("eager")  # type: ignore[operator]
            if getattr(config, "_attn_implementation", None) == "eager":
                return reference
        first = next(reference.parameters())
        return load_hf(config._name_or_path, dtype=first.dtype, device=first.device,
                       attn_implementation="eager").hf_model

    return eager
