"""The frozen, linear model behind an attribution graph, as probes that run where the model runs.

circuit-tracer (Ameisen et al. 2025) makes the model linear on one prompt before it attributes:
attention patterns and normalisation scales are frozen at their values on that prompt, each
dictionary's error term becomes a constant input, and the dictionaries' features are the only
nonlinearities left — held at their activations, they are the graph's nodes. Every other input
(the token embeddings, the error terms) is a node too, and what remains (biases, decoder biases)
is a constant. Then every target (a feature's pre-activation, the output logit) is exactly the
sum of its inputs' direct effects, ``value(source) * d target / d source`` through the frozen
model, plus that constant.

Here the freezing is done by probes at canonical points, so it runs unchanged on local, remote
and sharded models: the recording run keeps the prompt's values in the scratch save context's
``ctx.state`` (on the rank of each point) and every later run replaces the live values by them:

* ``layers.i.attn.pattern`` — the post-softmax pattern (gradients then reach only the values);
* every ``*.scale`` of a normalisation (``ln1.scale``, ``ln2.scale``, ``final_norm.scale``, ...)
  — the norm is then linear in its input;
* the MLP's activation, which circuit-tracer never meets because its transcoders replace the
  MLPs: a gated MLP (``act(gate) * up``) keeps ``act(gate)``, an ungated one the ratio
  ``act(pre) / pre`` — both equal the model's value on the prompt and are linear in the input;
* ``dict:<name>:features`` — the recorded activations, as a leaf whose gradient the graph reads;
* ``dict:<name>:error`` — the recorded error, held by :class:`Hold` (constant value, zero
  gradient to the live error).

A target at a dictionary's input point is a gradient *injected* there (:class:`Inject`): its
row of the batch then back-propagates ``d <x, w_enc> / d everything upstream``. One backward pass
computes one target per batch row, as circuit-tracer batches its targets.

The functions here run inside probes on the server; they are module-level (cloudpickle ships
them by reference) and small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["Hold", "Inject"]

#: ``ctx.state`` keys of the recording run
REC = "graph:rec:"
ACTIVE = "graph:active:"
GATE = "graph:gate:"
LIVE = "graph:live:"

Probe = Callable[[Any, torch.Tensor], Any]
#: a change to one source in one row: (kind, dictionary, row, position, feature, factor)
Edit = tuple[str, "str | None", int, int, "int | None", float]


class Inject(torch.autograd.Function):
    """Identity forward; the backward adds ``extra`` to the incoming gradient — as if the
    objective had the term ``<x, extra>`` at this point."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        ctx.extra = extra
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad + ctx.extra.to(grad.dtype), None


class Hold(torch.autograd.Function):
    """The value ``held``, with a zero gradient to ``live``: a constant input that keeps
    ``live`` on the graph, so that a gradient injected upstream of it still flows."""

    @staticmethod
    def forward(ctx: Any, live: torch.Tensor, held: torch.Tensor) -> torch.Tensor:
        return held.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(grad), None


# --------------------------------------------------------------------------- recording
def record(ctx: Any, x: torch.Tensor) -> None:
    """Keep the prompt's value at this point (patterns, scales, the embedding)."""
    ctx.state[REC + ctx.point] = x.detach().clone()


def record_mlp_in(ctx: Any, x: torch.Tensor) -> None:
    """The MLP's input to its activation's multiplier: ``up`` (gated) or ``pre``."""
    ctx.state[f"{LIVE}{ctx.layer}"] = x.detach().clone()


def record_mlp_post(ctx: Any, x: torch.Tensor) -> None:
    """The frozen gate: ``post / in``, i.e. ``act(gate)`` or ``act(pre) / pre``."""
    inp = ctx.state.pop(f"{LIVE}{ctx.layer}")
    post = x.detach()
    ctx.state[f"{GATE}{ctx.layer}"] = torch.where(inp != 0, post / inp, torch.zeros_like(post))


def record_features(ctx: Any, f: torch.Tensor) -> None:
    """Keep the features and list the active ones (position, feature, activation)."""
    kept = f.detach().clone()
    ctx.state[REC + ctx.point] = kept
    pos, idx = kept[0].nonzero(as_tuple=True)
    values = kept[0, pos, idx]
    ctx.state[ACTIVE + ctx.point] = (pos, idx, values)
    ctx.save("active:" + ctx.point, torch.stack([pos, idx]).long())
    ctx.save("values:" + ctx.point, values.double())


def record_error(ctx: Any, e: torch.Tensor) -> None:
    kept = e.detach().clone()
    ctx.state[REC + ctx.point] = kept
    ctx.save("norms:" + ctx.point, kept[0].flatten(1).double().norm(dim=-1))


def record_logits(ctx: Any, logits: torch.Tensor) -> None:
    ctx.save("logits", logits.detach()[0, -1].double())


# --------------------------------------------------------------------------- replaying
def frozen(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """The recorded value (one row) for every row: a pattern or a norm scale."""
    return ctx.state[REC + ctx.point].to(x.dtype).expand(x.shape)


def stash_mlp_in(ctx: Any, x: torch.Tensor) -> None:
    ctx.state[f"{LIVE}{ctx.layer}"] = x


def frozen_gate(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """``gate * in`` with the recorded gate and the live input: linear in the input."""
    live = ctx.state.pop(f"{LIVE}{ctx.layer}")
    return ctx.state[f"{GATE}{ctx.layer}"].to(live.dtype) * live


def _edited(value: torch.Tensor, kind: str, name: str | None, edits: tuple[Edit, ...],
            zero: bool) -> torch.Tensor:
    """``value`` with the run's edits of sources of this kind (and dictionary) applied."""
    if zero:
        value.zero_()
    for e_kind, e_name, row, pos, feature, factor in edits:
        if e_kind != kind or e_name != name:
            continue
        if feature is None:
            value[row, pos] *= factor
        else:
            value[row, pos, feature] *= factor
    return value


def frozen_features(name: str, edits: tuple[Edit, ...], zero: bool) -> Probe:
    def frozen_features(ctx: Any, f: torch.Tensor) -> torch.Tensor:
        out = ctx.state[REC + ctx.point].to(f.dtype).expand(f.shape).clone()
        out = _edited(out, "feature", name, edits, zero)
        return out.requires_grad_(True) if f.requires_grad else out

    return frozen_features


def frozen_error(name: str, edits: tuple[Edit, ...], zero: bool) -> Probe:
    def frozen_error(ctx: Any, e: torch.Tensor) -> torch.Tensor:
        held = _edited(ctx.state[REC + ctx.point].to(e.dtype).expand(e.shape).clone(),
                       "error", name, edits, zero)
        if e.requires_grad:
            return Hold.apply(e, held)
        return held.requires_grad_(True) if torch.is_grad_enabled() else held

    return frozen_error


def edited_embedding(edits: tuple[Edit, ...], zero: bool) -> Probe:
    def edited_embedding(ctx: Any, x: torch.Tensor) -> torch.Tensor | None:
        if not zero and not any(e[0] == "token" for e in edits):
            return None
        return _edited(x.detach().clone(), "token", None, edits, zero)

    return edited_embedding


def target(tag: str, name: str, rows: torch.Tensor, positions: torch.Tensor,
           directions: torch.Tensor, inject: bool) -> Probe:
    """At a dictionary's input point: save ``<x[row, pos], w>`` for each target (the linear
    part of its pre-activation) and, in a backward run, inject ``w`` at (row, pos)."""

    def graph_target(ctx: Any, x: torch.Tensor) -> torch.Tensor | None:
        flat = x.flatten(2)  # per-head points: heads flattened, as the dictionary reads them
        w = directions.to(flat.device)
        r, p = rows.to(flat.device), positions.to(flat.device)
        ctx.save(f"{tag}:s:{name}", (flat[r, p].detach().double() * w.double()).sum(-1))
        if not (inject and torch.is_grad_enabled()):
            return None
        extra = torch.zeros_like(flat)
        extra.index_put_((r, p), w.to(flat.dtype), accumulate=True)
        return Inject.apply(x, extra.view_as(x))

    return graph_target


def logit_value(tag: str, token: int) -> Probe:
    def graph_logit(ctx: Any, logits: torch.Tensor) -> None:
        ctx.save(f"{tag}:logit", logits.detach()[:, -1, token].double())

    return graph_logit


def logit_objective(token: int, rows: list[float]) -> Callable[[Any], torch.Tensor]:
    """What the backward pass starts from: the target logit of the rows that target it (the
    other rows contribute zero, but stay on the graph for the gradients injected upstream)."""

    def graph_objective(outputs: Any) -> torch.Tensor:
        logits = outputs.logits[:, -1, token].float()
        return (logits * torch.tensor(rows, device=logits.device)).sum()

    return graph_objective


# --------------------------------------------------------------------------- gradients
def feature_grads(tag: str, name: str) -> Probe:
    """Direct effects of the active features: ``activation * d target / d feature``."""

    def graph_feature_grads(ctx: Any, grad: torch.Tensor) -> None:
        point = f"dict:{name}:features"
        pos, idx, values = ctx.state[ACTIVE + point]
        g = grad[:, pos.to(grad.device), idx.to(grad.device)].double()
        ctx.save(f"{tag}:gf:{name}", g * values.to(g.device).double())

    return graph_feature_grads


def input_grads(tag: str, key: str, point: str) -> Probe:
    """Direct effects of a vector input per position (an error term, the token embedding):
    ``<value, d target / d value>``."""

    def graph_input_grads(ctx: Any, grad: torch.Tensor) -> None:
        value = ctx.state[REC + point].to(grad.device).double()
        ctx.save(f"{tag}:{key}", (grad.double() * value).flatten(2).sum(-1))

    return graph_input_grads
