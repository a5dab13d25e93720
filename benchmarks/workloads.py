"""Interpretability workloads: cloche (local, remote, sharded) beside NNsight and TransformerLens.

The workloads interpretability backends are compared on, each written the way a researcher
would write it in each tool, on one GPT-2-architecture model (4 layers, d_model 256, random
weights, built from a config and saved with ``save_pretrained``; every tool loads its own copy):

- ``logit lens``: every layer's ``resid_post`` through the final norm and the unembedding,
  top-1 token per position and layer;
- ``steer``: a steering vector added to one layer's ``resid_post``, logits returned;
- ``steer generate``: the same vector at every decode step of a 32-token greedy generation;
- ``patch positions``: activation patching at every position of one layer (one clean run, then
  one batched run of the corrupted prompt, copy ``p`` patched at position ``p``), a logit
  difference per position;
- ``attribution``: gradient × activation at every position and layer (``resid_pre``) for a
  logit difference — one forward, one backward;
- ``capture-all``: the 59 canonical points saved and fetched (probe_overhead.py's case);
- ``reduce <R>``: Mean / TopK / Histogram at every layer's ``mlp.post`` and Covariance at every
  ``resid_post`` over ``--dataset-batches`` batches: cloche ``run`` batch by batch (with and
  without logits), ``run_dataset``; the floor is plain HF with a PyTorch forward hook doing the
  same statistic with torch alone.

Each workload has its own baseline, the plain Hugging Face model doing the same forward passes
(or ``generate``) with no intervention, and every row is a CPU-time ratio to it (one torch
thread; interleaved rounds; see ``_common.py``). The remote rows talk to a real
``cloche.server.Server`` on 127.0.0.1 in this process, so the process's CPU time counts both
sides; the sharded rows add the CPU time of the rank-1 worker process. Before timing, each
row's result is compared with the baseline tool's (a row that disagrees is reported, not timed).

    python benchmarks/workloads.py                       # quick: 3 rounds, 4 dataset batches
    python benchmarks/workloads.py --rounds 30 --dataset-batches 64
    python benchmarks/workloads.py --only "reduce Mean" --profile "reduce Mean · cloche local run"
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    Case,
    Timing,
    add_model_arguments,
    add_profile_arguments,
    fix_threads,
    load_average,
    measure,
    profile_named,
)
from probe_overhead import (
    build_model,
    canonical_points,
    load_hf,
    nnsight_trace,
    peer_version,
    saver,
    tl_name,
)

import cloche

STEER_LAYER = 1
PATCH_LAYER = 1
TOKENS = (5, 7)  # the logit difference of the patching and attribution workloads
BASELINE = "plain HF"
TOKEN = "workloads-benchmark-token"


@dataclass
class Setup:
    """Everything the workloads share: the model directory, inputs and the tools."""

    directory: Path
    layers: int
    d_model: int
    ids: torch.Tensor
    mask: torch.Tensor
    prompt: torch.Tensor
    patch_len: int
    batches: list[torch.Tensor]
    hf: torch.nn.Module
    cloche: dict[str, cloche.Model] = field(default_factory=dict)
    clocks: dict[str, Callable[[], float]] = field(default_factory=dict)
    nnsight: Any = None
    nnsight_hf: Any = None
    nnsight_eager: Any = None  # capture-all: eager attention returns the pattern to save
    nnsight_lm: Any = None
    bridge: Any = None
    skipped: dict[str, str] = field(default_factory=dict)


Workload = dict[str, Callable[[], Any]]  # tool -> does the work once, returns a checkable value


# ---------------------------------------------------------------------------- helpers
def no_grad(fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        with torch.no_grad():
            return fn()
    return run


def hf_logits(hf: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def logit_diff(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1, TOKENS[0]] - logits[:, -1, TOKENS[1]]


def fetch_all(model: cloche.Model, name: str) -> dict[str, list[torch.Tensor]]:
    handle = model.save_context(name)
    out = handle.fetch_all(mode="list")  # every key in one request
    handle.clear()
    return out


def tl_hook_point(point: str) -> str:
    return tl_name(point)


# ---------------------------------------------------------------------------- workloads
def logit_lens(s: Setup) -> Workload:
    n = s.layers
    points = [f"layers.{i}.resid_post" for i in range(n)]
    tools: Workload = {BASELINE: no_grad(lambda: hf_logits(s.hf, s.ids))}

    def cloche_lens(model: cloche.Model) -> Callable[[], Any]:
        w_u = model.param("unembed.W_U")
        w, b = model.param("ln_final.w"), model.param("ln_final.b")
        probes = {p: (lambda c, x: c.save(f"r{c.layer}", x)) for p in points}

        def run() -> torch.Tensor:
            model.run(s.ids, probes=probes, save="lens", return_logits=False)
            resid = fetch_all(model, "lens")
            return torch.stack([(F.layer_norm(resid[f"r{i}"][0], (s.d_model,), w, b) @ w_u)
                                .argmax(-1) for i in range(n)])
        return no_grad(run)

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = cloche_lens(model)
    if s.nnsight is not None:
        lm = s.nnsight

        def nnsight_lens() -> torch.Tensor:
            lens: list[Any] = []
            with torch.no_grad(), lm.trace(input_ids=s.ids, attention_mask=s.mask):
                for i in range(n):
                    lens.append(lm.lm_head(lm.transformer.ln_f(lm.transformer.h[i].output))  # noqa: PERF401 - a traced loop
                                .argmax(-1).save())
            return torch.stack(list(lens))
        tools["NNsight"] = nnsight_lens
    if s.bridge is not None:
        bridge, names = s.bridge, [tl_hook_point(p) for p in points]

        def tl_lens() -> torch.Tensor:
            _, cache = bridge.run_with_cache(s.ids, names_filter=names)
            return torch.stack([bridge.unembed(bridge.ln_final(cache[name])).argmax(-1)
                                for name in names])
        tools["TransformerLens"] = no_grad(tl_lens)
    return tools


def steering_vector(d_model: int) -> torch.Tensor:
    return torch.randn(d_model, generator=torch.Generator().manual_seed(1)) * 4


def steer(s: Setup) -> Workload:
    vec = steering_vector(s.d_model)
    point = f"layers.{STEER_LAYER}.resid_post"
    tools: Workload = {BASELINE: no_grad(lambda: hf_logits(s.hf, s.ids))}

    def add(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x + vec

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = lambda model=model: model.run(s.ids, probes={point: add}).logits
    if s.nnsight is not None:
        lm = s.nnsight

        def nnsight_steer() -> torch.Tensor:
            out: list[Any] = []
            with torch.no_grad(), lm.trace(input_ids=s.ids, attention_mask=s.mask):
                block = lm.transformer.h[STEER_LAYER]
                block.output = block.output + vec
                out.append(lm.lm_head.output.save())
            return out[0]
        tools["NNsight"] = nnsight_steer
    if s.bridge is not None:
        bridge = s.bridge
        hook = [(tl_hook_point(point), lambda x, hook: x + vec)]
        tools["TransformerLens"] = no_grad(lambda: bridge.run_with_hooks(s.ids, fwd_hooks=hook))
    return tools


def steer_generate(s: Setup, new_tokens: int = 32) -> Workload:
    vec = steering_vector(s.d_model)
    point = f"layers.{STEER_LAYER}.resid_post"
    prompt, pmask = s.prompt, torch.ones_like(s.prompt)
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
               "pad_token_id": 1}
    tools: Workload = {
        BASELINE: no_grad(lambda: s.hf.generate(prompt, attention_mask=pmask, **options)[0])}

    def add(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x + vec

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = lambda model=model: model.generate(
            prompt, new_tokens, probes={point: add}).tokens
    if s.nnsight_lm is not None:
        lm = s.nnsight_lm

        def nnsight_generate() -> torch.Tensor:
            out: list[Any] = []
            with torch.no_grad(), lm.generate(**options) as tracer:
                with tracer.invoke({"input_ids": prompt, "attention_mask": pmask}):  # noqa: SIM117 - all() in invoke
                    with tracer.all():
                        block = lm.transformer.h[STEER_LAYER]
                        block.output = block.output + vec
                with tracer.invoke():
                    out.append(lm.generator.output.save())
            return out[0][0]
        tools["NNsight"] = nnsight_generate
    if s.bridge is not None:
        bridge = s.bridge
        hook = [(tl_hook_point(point), lambda x, hook: x + vec)]

        def tl_generate() -> torch.Tensor:
            with bridge.hooks(fwd_hooks=hook):
                return bridge.generate(prompt, max_new_tokens=new_tokens, do_sample=False,
                                       stop_at_eos=False, verbose=False)[0]
        tools["TransformerLens"] = no_grad(tl_generate)
    return tools


def patch_positions(s: Setup) -> Workload:
    """Clean prompt = ``prompt``; corrupted = the same with its first half shuffled."""
    n = s.patch_len
    clean = s.prompt[:, :n]
    corrupted = clean.clone()
    corrupted[0, : n // 2] = corrupted[0, : n // 2].flip(0)
    tiled = corrupted.repeat(n, 1)
    rows = torch.arange(n)
    point = f"layers.{PATCH_LAYER}.resid_pre"

    def hf_plain() -> torch.Tensor:
        hf_logits(s.hf, clean)
        return logit_diff(hf_logits(s.hf, tiled))
    tools: Workload = {BASELINE: no_grad(hf_plain)}

    def keep_clean(ctx: Any, x: torch.Tensor) -> None:
        ctx.state["clean"] = x.detach().clone()

    def patch(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[rows, rows] = ctx.state["clean"][0, rows].to(y)
        return y

    def metric(ctx: Any, logits: torch.Tensor) -> None:
        ctx.save("diff", logits[:, -1, TOKENS[0]] - logits[:, -1, TOKENS[1]])

    def cloche_patch(model: cloche.Model) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            model.run(clean, probes={point: keep_clean}, save="patch", return_logits=False)
            model.run(tiled, probes={point: patch, "logits": metric}, save="patch",
                      return_logits=False)
            return fetch_all(model, "patch")["diff"][0]
        return run

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = cloche_patch(model)
    if s.nnsight is not None:
        lm = s.nnsight

        def nnsight_patch() -> torch.Tensor:
            out: list[Any] = []
            with torch.no_grad(), lm.trace(input_ids=clean, attention_mask=torch.ones_like(clean)):
                out.append(lm.transformer.h[PATCH_LAYER].input.save())
            cached = out.pop()
            with torch.no_grad(), lm.trace(input_ids=tiled, attention_mask=torch.ones_like(tiled)):
                lm.transformer.h[PATCH_LAYER].input[rows, rows] = cached[0, rows]
                logits = lm.lm_head.output
                out.append((logits[:, -1, TOKENS[0]] - logits[:, -1, TOKENS[1]]).save())
            return out[0]
        tools["NNsight"] = nnsight_patch
    if s.bridge is not None:
        bridge, name = s.bridge, tl_hook_point(point)

        def tl_patch() -> torch.Tensor:
            _, cache = bridge.run_with_cache(clean, names_filter=[name])

            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                x[rows, rows] = cache[name][0, rows]
                return x
            return logit_diff(bridge.run_with_hooks(tiled, fwd_hooks=[(name, hook)]))
        tools["TransformerLens"] = no_grad(tl_patch)
    return tools


def attribution(s: Setup) -> Workload:
    n = s.layers
    points = [f"layers.{i}.resid_pre" for i in range(n)]
    hf = s.hf

    def hf_plain() -> torch.Tensor:
        hf.zero_grad(set_to_none=True)
        metric = logit_diff(hf_logits(hf, s.ids)).sum()
        metric.backward()
        return metric.detach()
    tools: Workload = {BASELINE: hf_plain}

    def act(ctx: Any, x: torch.Tensor) -> None:
        ctx.save(f"a{ctx.layer}", x)

    def grad(ctx: Any, g: torch.Tensor) -> None:
        ctx.save(f"g{ctx.layer}", g)

    def metric_of(out: Any) -> torch.Tensor:
        return (out.logits[:, -1, TOKENS[0]] - out.logits[:, -1, TOKENS[1]]).sum()

    def cloche_attr(model: cloche.Model) -> Callable[[], Any]:
        probes, grads = dict.fromkeys(points, act), dict.fromkeys(points, grad)

        def run() -> torch.Tensor:
            model.run(s.ids, probes=probes, grad_probes=grads, backward=metric_of,
                      return_logits=False, save="attr")
            saved = fetch_all(model, "attr")
            return torch.stack([(saved[f"a{i}"][0] * saved[f"g{i}"][0]).sum(-1)
                                for i in range(n)])
        return run

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = cloche_attr(model)
    if s.nnsight is not None:
        lm = s.nnsight

        def nnsight_attr() -> torch.Tensor:
            acts: list[Any] = []
            grads: list[Any] = []
            s.nnsight_hf.zero_grad(set_to_none=True)
            with lm.trace(input_ids=s.ids, attention_mask=s.mask):
                for i in range(n):
                    acts.append(lm.transformer.h[i].input.save())  # noqa: PERF401 - a traced loop
                logits = lm.lm_head.output
                metric = (logits[:, -1, TOKENS[0]] - logits[:, -1, TOKENS[1]]).sum()
                with metric.backward():
                    for i in reversed(range(n)):
                        grads.append(acts[i].grad.save())  # noqa: PERF401 - a traced loop
            grads.reverse()
            return torch.stack([(a * g).sum(-1) for a, g in zip(acts, grads, strict=True)]
                               ).detach()
        tools["NNsight"] = nnsight_attr
    if s.bridge is not None:
        bridge, names = s.bridge, [tl_hook_point(p) for p in points]

        def tl_attr() -> torch.Tensor:
            bridge.zero_grad(set_to_none=True)
            acts: dict[str, torch.Tensor] = {}
            grads: dict[str, torch.Tensor] = {}

            def keep(store: dict[str, torch.Tensor], name: str) -> Callable[..., None]:
                def hook(x: torch.Tensor, hook: Any) -> None:
                    store[name] = x.detach()
                return hook
            with bridge.hooks(fwd_hooks=[(nm, keep(acts, nm)) for nm in names],
                              bwd_hooks=[(nm, keep(grads, nm)) for nm in names]):
                logit_diff(bridge(s.ids)).sum().backward()
            return torch.stack([(acts[nm] * grads[nm]).sum(-1) for nm in names])
        tools["TransformerLens"] = tl_attr
    return tools


def capture_all(s: Setup) -> Workload:
    some = next(iter(s.cloche.values()))
    points = canonical_points(some)
    tools: Workload = {BASELINE: no_grad(lambda: hf_logits(s.hf, s.ids))}
    capture = dict.fromkeys(points, saver)

    def cloche_capture(model: cloche.Model) -> Callable[[], Any]:
        def run() -> torch.Tensor:
            model.run(s.ids, probes=capture, save="capture", return_logits=False)
            return fetch_all(model, "capture")["logits"][0]
        return run

    for where, model in s.cloche.items():
        tools[f"cloche {where}"] = cloche_capture(model)
    if s.nnsight is not None:
        tools["NNsight"] = lambda: nnsight_trace(s.nnsight_eager, s.ids, s.mask,
                                                 s.layers)["logits"]
    if s.bridge is not None:
        names = [tl_name(p) for p in points]
        tools["TransformerLens"] = no_grad(
            lambda: s.bridge.run_with_cache(s.ids, names_filter=names)[1]["unembed.hook_out"])
    return tools


# ---------------------------------------------------------------------------- reductions
@dataclass
class Reduction:
    """One reducer kind: where it reads, cloche's reducer, and the torch-only floor."""

    name: str
    suffix: str
    make: Callable[[], cloche.Reducer]
    floor: Callable[[list[torch.Tensor]], Callable[[torch.Tensor], None]]


def _mean_floor(state: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    def update(x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1])
        batch = rows.sum(0, dtype=torch.float64).div_(rows.shape[0])
        if not state:
            state.extend([batch, torch.tensor(rows.shape[0])])
            return
        n = int(state[1])
        state[0].add_(batch - state[0], alpha=rows.shape[0] / (n + rows.shape[0]))
        state[1] += rows.shape[0]
    return update


def _topk_floor(k: int) -> Callable[[list[torch.Tensor]], Callable[[torch.Tensor], None]]:
    def make(state: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        def update(x: torch.Tensor) -> None:
            rows = x.reshape(-1, x.shape[-1])
            values = rows.topk(k, 0).values.to(torch.float64)
            if state:
                values = torch.cat([state[0], values]).topk(k, 0).values
                state.clear()
            state.append(values)
        return update
    return make


def _histogram_floor(bins: int, low: float, high: float
                     ) -> Callable[[list[torch.Tensor]], Callable[[torch.Tensor], None]]:
    def make(state: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
        def update(x: torch.Tensor) -> None:
            rows = x.reshape(-1, x.shape[-1])
            d = rows.shape[1]
            idx = ((rows - low) * (bins / (high - low))).floor_().clamp_(-1, bins).long() + 1
            idx += torch.arange(d) * (bins + 2)
            counts = torch.bincount(idx.reshape(-1), minlength=d * (bins + 2))
            if state:
                state[0] += counts
            else:
                state.append(counts)
        return update
    return make


def _covariance_floor(state: list[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    def update(x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).to(torch.float64)
        mean = rows.mean(0)
        centred = rows.sub_(mean)
        comoment = centred.T @ centred
        if not state:
            state.extend([mean, comoment, torch.tensor(rows.shape[0])])
            return
        n_a, n_b = int(state[2]), rows.shape[0]
        delta = mean - state[0]
        state[0].add_(delta, alpha=n_b / (n_a + n_b))
        state[1].add_(comoment).add_(torch.outer(delta, delta), alpha=n_a * n_b / (n_a + n_b))
        state[2] += n_b
    return update


REDUCTIONS = (
    Reduction("Mean", "mlp.post", cloche.Mean, _mean_floor),
    Reduction("TopK", "mlp.post", lambda: cloche.TopK(8), _topk_floor(8)),
    Reduction("Histogram", "mlp.post", lambda: cloche.Histogram(64, -4.0, 4.0),
              _histogram_floor(64, -4.0, 4.0)),
    Reduction("Covariance", "resid_post", cloche.Covariance, _covariance_floor),
)

HF_SITES = {"mlp.post": ("mlp.c_proj", "input"), "resid_post": ("", "output")}


def reduction(s: Setup, r: Reduction) -> Workload:
    points = [f"layers.{i}.{r.suffix}" for i in range(s.layers)]
    module_path, where = HF_SITES[r.suffix]
    blocks = s.hf.transformer.h
    modules = [blocks[i].get_submodule(module_path) if module_path else blocks[i]
               for i in range(s.layers)]

    def hf_plain() -> torch.Tensor:
        for ids in s.batches:
            logits = hf_logits(s.hf, ids)
        return logits

    def hf_body() -> torch.Tensor:
        for ids in s.batches:
            hidden = s.hf.transformer(input_ids=ids, attention_mask=torch.ones_like(ids))
        return hidden.last_hidden_state

    def hf_floor() -> Any:
        states: list[list[torch.Tensor]] = [[] for _ in modules]
        handles = []
        for module, state in zip(modules, states, strict=True):
            update = r.floor(state)
            if where == "input":
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, update=update: update(a[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, a, o, update=update: update(o)))
        try:
            for ids in s.batches:
                hf_logits(s.hf, ids)
        finally:
            for handle in handles:
                handle.remove()
        return states

    tools: Workload = {BASELINE: no_grad(hf_plain),
                       "plain HF, no unembedding": no_grad(hf_body),
                       "plain HF + torch hook (floor)": no_grad(hf_floor)}

    def reduce_probe(ctx: Any, x: torch.Tensor) -> None:
        ctx.reduce(f"{r.name}{ctx.layer}", x, r.make())

    probes = dict.fromkeys(points, reduce_probe)
    dataset = cloche.data.Dataset([row.tolist() for ids in s.batches for row in ids],
                                  name="bench", seq_len=s.ids.shape[1], pad_id=1)
    batch = s.batches[0].shape[0]

    def run_batches(model: cloche.Model, logits: bool) -> Callable[[], Any]:
        handle = model.save_context("reduce")

        def run() -> Any:
            for ids in s.batches:
                model.run(ids, probes=probes, save="reduce", return_logits=logits)
            out = {f"{r.name}{i}": handle.result(f"{r.name}{i}") for i in range(s.layers)}
            handle.clear()
            return out
        return run

    def run_dataset(model: cloche.Model) -> Callable[[], Any]:
        handle = model.save_context("reduce")

        def run() -> Any:
            out = model.run_dataset(dataset, probes=probes, save="reduce", batch_size=batch,
                                    progress=False)
            handle.clear()
            return out
        return run

    for place, model in s.cloche.items():
        if place == "local":
            tools["cloche local run"] = run_batches(model, True)
            tools["cloche local run, return_logits=False"] = run_batches(model, False)
        tools[f"cloche {place} run_dataset"] = run_dataset(model)
    if r.name == "Mean" and s.nnsight is not None:
        lm = s.nnsight

        def nnsight_mean() -> torch.Tensor:
            sums: list[Any] = [0.0] * s.layers
            for ids in s.batches:
                saved: list[Any] = []
                with torch.no_grad(), lm.trace(input_ids=ids, attention_mask=torch.ones_like(ids)):
                    for i in range(s.layers):
                        saved.append(lm.transformer.h[i].mlp.c_proj.input  # noqa: PERF401 - a traced loop
                                     .sum((0, 1), dtype=torch.float64).save())
                sums = [a + b for a, b in zip(sums, saved, strict=True)]
            return torch.stack(sums) / (len(s.batches) * ids.numel())
        tools["NNsight"] = nnsight_mean
    if r.name == "Mean" and s.bridge is not None:
        bridge = s.bridge
        names = [tl_name(p) for p in points]

        def tl_mean() -> torch.Tensor:
            sums = dict.fromkeys(names, 0.0)

            def adder(name: str) -> Callable[..., None]:
                def add(x: torch.Tensor, hook: Any) -> None:
                    sums[name] = sums[name] + x.sum((0, 1), dtype=torch.float64)
                return add
            with bridge.hooks(fwd_hooks=[(nm, adder(nm)) for nm in names]):
                for ids in s.batches:
                    bridge(ids)
            return torch.stack([sums[nm] for nm in names])
        tools["TransformerLens"] = no_grad(tl_mean)
    return tools


WORKLOADS: dict[str, Callable[[Setup], Workload]] = {
    "logit lens": logit_lens,
    "steer": steer,
    "steer generate": steer_generate,
    "patch positions": patch_positions,
    "attribution": attribution,
    "capture-all": capture_all,
    **{f"reduce {r.name}": (lambda s, r=r: reduction(s, r)) for r in REDUCTIONS},
}


# ---------------------------------------------------------------------------- checks
def agree(value: Any, reference: Any) -> bool:
    """Whether two results hold the same numbers (ints exactly, floats to ~1e-3 relative)."""
    if isinstance(reference, torch.Tensor):
        if not isinstance(value, torch.Tensor) or value.shape != reference.shape:
            return False
        if not reference.is_floating_point():
            return bool((value == reference).float().mean() > 0.99)  # argmax ties may flip
        return torch.allclose(value.double(), reference.double(), rtol=1e-3, atol=1e-3)
    return True  # reductions: compared against each other below


def checked(name: str, tools: Workload, skipped: dict[str, str]) -> Workload:
    """Run every tool once; drop (and report) the ones that fail or disagree with the baseline."""
    kept: Workload = {}
    reference: Any = None
    for tool, fn in tools.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fn()
        except Exception as exc:  # noqa: BLE001 - a tool that cannot do the work is reported
            skipped[f"{name} · {tool}"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            continue
        if tool != BASELINE and reference is None:
            reference = value  # the first tool's (cloche local's) result
            kept[tool] = fn
        elif name.startswith(("reduce", "capture")) or tool == BASELINE or agree(value, reference):
            kept[tool] = fn
        else:
            skipped[f"{name} · {tool}"] = "result differs from the baseline's"
    return kept


# ---------------------------------------------------------------------------- setup
def worker_cpu(model: cloche.Model) -> Callable[[], float]:
    """This process's CPU time plus that of a sharded model's worker processes."""
    import psutil

    workers = [psutil.Process(p.pid) for p in model.executor.group.processes.values()]

    def clock() -> float:
        total = time.process_time()
        for w in workers:
            t = w.cpu_times()
            total += t.user + t.system
        return total
    return clock


def build_setup(args: argparse.Namespace, directory: Path, stack: contextlib.ExitStack
                ) -> Setup:
    torch.manual_seed(args.seed)
    ids = torch.randint(2, args.vocab, (args.batch, args.seq))
    setup = Setup(
        directory=directory, layers=args.layers, d_model=args.d_model, ids=ids,
        mask=torch.ones_like(ids), prompt=torch.randint(2, args.vocab, (1, args.prompt)),
        patch_len=args.patch_len,
        batches=[torch.randint(2, args.vocab, (args.batch, args.seq))
                 for _ in range(args.dataset_batches)],
        hf=load_hf(directory))
    places = set(args.cloche)
    if "local" in places:
        setup.cloche["local"] = cloche.load(directory)
    if "remote" in places:
        from cloche.server import Server, ServerConfig

        server = Server(cloche.load(directory), ServerConfig(token=TOKEN, port=0))
        host, port = server.start()
        stack.callback(server.shutdown)
        remote = cloche.connect(f"{host}:{port}", token=TOKEN)
        stack.callback(remote.close)
        setup.cloche["remote"] = remote
    if "sharded" in places:
        import os

        from cloche.sharding import start_local

        # rank 1 unpickles the probes by reference to this folder's modules (probe_overhead)
        here = str(Path(__file__).resolve().parent)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (here, os.environ.get("PYTHONPATH")) if p)
        sharded = start_local(directory, 2, threads=args.threads)
        stack.callback(sharded.close)
        setup.cloche["sharded ws2"] = sharded
        setup.clocks["sharded ws2"] = worker_cpu(sharded)
    peers = set(args.peers)
    if "nnsight" in peers:
        try:
            from nnsight import LanguageModel, NNsight

            setup.nnsight_hf = load_hf(directory)
            setup.nnsight = NNsight(setup.nnsight_hf)
            setup.nnsight_eager = NNsight(load_hf(directory, attn="eager"))
            setup.nnsight_lm = LanguageModel(
                load_hf(directory), tokenizer=transformers.AutoTokenizer.from_pretrained(directory))
        except Exception as exc:  # noqa: BLE001
            setup.skipped["NNsight"] = f"{type(exc).__name__}: {exc}"
    if "transformer-lens" in peers:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            setup.bridge = TransformerBridge.boot_transformers(
                str(directory), hf_model=load_hf(directory),
                tokenizer=transformers.AutoTokenizer.from_pretrained(directory), device="cpu")
        except Exception as exc:  # noqa: BLE001
            setup.skipped["TransformerLens"] = f"{type(exc).__name__}: {exc}"
    return setup


def build_cases(setup: Setup, only: list[str] | None) -> list[Case]:
    cases = []
    for name, make in WORKLOADS.items():
        if only and name not in only:
            continue
        for tool, fn in checked(name, make(setup), setup.skipped).items():
            clock = next((c for place, c in setup.clocks.items() if tool == f"cloche {place}"
                          or tool.startswith(f"cloche {place} ")), None)
            cases.append(Case(f"{name} · {tool}", fn, cpu=clock))
    return cases


# ---------------------------------------------------------------------------- fixed cost
def fixed_costs(setup: Setup, calls: int, rounds: int) -> list[str]:
    """What a request costs remote over local when the work is nothing: a 1×8 run, no probes
    and with one probe (shipped with cloudpickle), and ``ping``; wall time, best of rounds."""
    if "remote" not in setup.cloche or "local" not in setup.cloche:
        return []
    ids = setup.ids[:1, :8]

    def noop(ctx: Any, x: torch.Tensor) -> None:
        return None

    work = {
        "run": lambda m: m.run(ids, return_logits=False),
        "run + probe": lambda m: m.run(ids, probes={"layers.0.mlp.post": noop},
                                       return_logits=False),
        "ping": lambda m: m.ping(),
    }
    lines = [(f"remote fixed cost per request over 127.0.0.1 (ms per call, best of {rounds}"
             f" rounds of {calls} calls; CPU time of this process, which runs the server too,"
             " and wall time; remote − local):")]
    for label, fn in work.items():
        best: dict[tuple[str, str], float] = {}
        for _ in range(rounds):
            for place in ("local", "remote"):
                model = setup.cloche[place]
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    fn(model)
                for clock, took in (("wall", time.perf_counter() - start),
                                    ("cpu", time.process_time() - start_cpu)):
                    ms = took / calls * 1e3
                    best[place, clock] = min(best.get((place, clock), ms), ms)
        cpu = best["remote", "cpu"] - best["local", "cpu"]
        wall = best["remote", "wall"] - best["local", "wall"]
        lines.append(f"- {label}: CPU local {best['local', 'cpu']:.3f}, remote"
                     f" {best['remote', 'cpu']:.3f} → +{cpu:.3f} ms; wall local"
                     f" {best['local', 'wall']:.3f}, remote {best['remote', 'wall']:.3f}"
                     f" → +{wall:.3f} ms")
    return lines


# ---------------------------------------------------------------------------- report
def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def table(timings: list[Timing], skipped: dict[str, str]) -> str:
    """One row per workload × tool: CPU-time ratio to the workload's plain HF row."""
    lines = [("| workload | tool | CPU ms median (p25–p75) | × plain HF (CPU medians) |"
             " × plain HF (paired rounds) |"),
             "| --- | --- | ---: | ---: | ---: |"]
    base: dict[str, Timing] = {}
    for t in timings:
        workload, tool = t.case.name.split(" · ", 1)
        if tool == BASELINE:
            base[workload] = t
    for t in timings:
        workload, tool = t.case.name.split(" · ", 1)
        b = base[workload]
        paired = statistics.median(x / y for x, y in zip(t.cpu, b.cpu, strict=True))
        lines.append(f"| {workload} | {tool} | {t.median('cpu') * 1e3:.1f}"
                     f" ({t.quantile(0.25, 'cpu') * 1e3:.1f}–{t.quantile(0.75, 'cpu') * 1e3:.1f})"
                     f" | {t.median('cpu') / b.median('cpu'):.3f} | {paired:.3f} |")
    for name, why in skipped.items():
        workload, _, tool = name.partition(" · ")
        lines.append(f"| {workload} | {tool or '(all)'} | — | — | not run: {why} |")
    return "\n".join(lines)




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_model_arguments(p)
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens for generation")
    p.add_argument("--patch-len", type=int, default=16, help="prompt tokens for patching")
    p.add_argument("--dataset-batches", type=int, default=4,
                   help="batches per reduction workload (the issue's figure: 64)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", action="append", help="a workload to run (repeatable)")
    p.add_argument("--cloche", nargs="*", default=["local", "remote", "sharded"])
    p.add_argument("--peers", nargs="*", default=["nnsight", "transformer-lens"])
    add_profile_arguments(p, calls=5)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    threads = fix_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="cloche-workloads-") as tmp, \
            contextlib.ExitStack() as stack:
        directory = Path(tmp)
        build_model(directory, layers=args.layers, d_model=args.d_model, heads=args.heads,
                    vocab=args.vocab, seq=args.seq, seed=args.seed)
        with contextlib.redirect_stderr(io.StringIO()):
            setup = build_setup(args, directory, stack)
            cases = build_cases(setup, args.only)
        if args.profile:
            return profile_named(cases, args.profile, args.profile_calls)
        load_before = load_average()
        timings = measure(cases, rounds=args.rounds, warmup=args.warmup, seed=args.seed,
                          progress=lambda m: print(m, file=sys.stderr))
        load_after = load_average()
        costs = fixed_costs(setup, calls=50, rounds=max(5, args.rounds))
    print(f"GPT-2 architecture, {args.layers} layers, d_model {args.d_model}, {args.heads} heads,"
          f" vocab {args.vocab}; batch {args.batch}×{args.seq}; generation: 1×{args.prompt}"
          f" prompt + 32 tokens; patching: 1×{args.patch_len}; reductions: "
          f"{args.dataset_batches} batches")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch"
          f" thread(s) (asked {threads}); {args.rounds} interleaved rounds after {args.warmup}"
          " warm-up call(s) per case; CPU time (sharded rows: both ranks)")
    print("versions: " + ", ".join(f"{k} {peer_version(k)}" for k in (
        "torch", "transformers", "transformer-lens", "nnsight")))
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_after}")
    print()
    print(table(timings, setup.skipped))
    if costs:
        print()
        print("\n".join(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
