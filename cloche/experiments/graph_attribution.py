"""A feature-to-feature attribution graph for one prompt, through the attached dictionaries.

``attribution_graph(model, prompt)`` linearises the model on the prompt as circuit-tracer does
(``graph_linear``: attention patterns, norm scales and MLP gates frozen at the prompt's values,
each dictionary's error a constant input, features held at their activations) and computes, for
the output logit and for every active feature, the direct effect of every source on it: a
feature's activation times the gradient of the target through the frozen model, an error's or
a token embedding's dot product with that gradient. Each backward pass computes one target per
batch row (``batch_size`` rows), all with probes, so the same code runs on local, remote and
sharded models; only the compact rows of the adjacency cross the network.

With more active features than ``max_nodes``, targets are chosen as circuit-tracer chooses them:
the logit first, then, batch by batch, the not yet computed features with the largest influence
on the logit through the rows computed so far. Features never computed stay in the graph as
sources only (their ``value`` is None and their row empty), so every computed row stays
complete; pruning drops them, as they have no incoming edges.

``AttributionGraph.verify_edge`` checks an edge by an explicit intervention: one forward pass of
two rows through the frozen model, the second with the source scaled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments import graph_linear as gl
from cloche.experiments._common import layer_of, reports, scratch, str_tokens
from cloche.experiments.graph import AttributionGraph, EdgeCheck, GraphNode, check_fraction

__all__ = ["attribution_graph", "verify_edge"]

LINEARISATION = (
    "attention patterns (layers.*.attn.pattern) frozen at their values on the prompt",
    "normalisation scales (*.scale) frozen at their values on the prompt",
    "MLP activations frozen: act(gate) of a gated MLP, act(pre)/pre of an ungated one",
    "dictionary errors (dict:*:error) held as constant inputs",
    "dictionary features held at their activations (the graph's nodes)",
)


@dataclass(frozen=True)
class _Dictionary:
    """An attached dictionary as the graph uses it."""

    name: str
    point: str
    out_point: str | None
    layer: int | None
    order: int
    scale: float  # what the encoder multiplies its input by (expected_average_only_in)
    shift: bool  # the encoder subtracts b_dec from its input

    def part(self, part: str) -> str:
        return f"dict:{self.name}:{part}"


@dataclass(frozen=True)
class _Freeze:
    patterns: tuple[str, ...]
    scales: tuple[str, ...]
    mlps: tuple[tuple[str, str], ...]  # (input of the gate's product, mlp.post)


@dataclass
class _Recorded:
    active: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]  # pos, index, activation
    error_norms: dict[str, np.ndarray]
    logits: torch.Tensor


# --------------------------------------------------------------------------- set-up
def _prompt_ids(model: Any, prompt: Any) -> torch.Tensor:
    if isinstance(prompt, str):
        ids = model.tokenize(prompt)
    else:
        ids = torch.as_tensor(prompt).reshape(-1).long()
    if ids.ndim != 1 or ids.numel() == 0:
        raise UsageError("attribution_graph needs one prompt: a text or token ids (seq,)")
    return ids


def _chosen(model: Any, names: Sequence[str] | None) -> list[_Dictionary]:
    attached = model.dictionaries()
    if not attached:
        raise UsageError("attribution_graph needs dictionaries: attach one with"
                         " model.attach_dictionary(...)")
    wanted = list(attached) if names is None else [names] if isinstance(names, str) \
        else list(names)
    order = {p.name: i for i, p in enumerate(model.probe_points())}
    out = []
    for name in wanted:
        summary = attached.get(name)
        if summary is None:
            raise UsageError(f"no dictionary named {name!r} is attached (attached:"
                             f" {sorted(attached)})")
        architecture = summary.get("architecture")
        how = summary.get("normalize_activations") or "none"
        factor = summary.get("norm_scaling_factor")
        if architecture in ("skip_transcoder", "jumprelu_skip_transcoder"):
            raise UsageError(f"dictionary {name!r} is a skip transcoder: attribution graphs"
                             " do not linearise its skip connection yet")
        if summary.get("rescale_acts_by_decoder_norm"):
            raise UsageError(f"dictionary {name!r} scales its features by its decoder norms"
                             " (rescale_acts_by_decoder_norm): attribution graphs do not"
                             " support that yet")
        if how not in ("none", "expected_average_only_in"):
            raise UsageError(f"dictionary {name!r} normalises its input per token ({how}):"
                             " attribution graphs support 'none' and 'expected_average_only_in'")
        transcoder = summary.get("out_point") is not None
        out.append(_Dictionary(
            name, summary["point"], summary.get("out_point"), layer_of(summary["point"]),
            order.get(summary["point"], len(order)),
            float(factor) if how == "expected_average_only_in" and factor else 1.0,
            bool(summary.get("apply_b_dec_to_input")) and not transcoder))
    return sorted(out, key=lambda d: d.order)


def _freeze_plan(model: Any, dictionaries: list[_Dictionary]) -> _Freeze:
    """The points whose values the linearisation freezes; a clear error for what it cannot."""
    points = {p.name: p for p in model.probe_points()}
    patterns, mlps, missing = [], [], []
    replaced = {d.out_point for d in dictionaries if d.out_point}
    for i in range(int(model.n_layers)):
        pattern = f"layers.{i}.attn.pattern"
        if pattern in points:
            patterns.append(pattern)
        else:
            missing.append(pattern)
        post = f"layers.{i}.mlp.post"
        gated = f"layers.{i}.mlp.pre_linear"
        source = gated if gated in points else f"layers.{i}.mlp.pre"
        if post in points and source in points:
            mlps.append((source, post))
        elif f"layers.{i}.mlp.out" not in replaced:
            missing.append(f"layers.{i}.mlp.pre/post")
    scales = [n for n, p in points.items() if p.kind == "ln" and n.endswith(".scale")]
    norms = [n for n, p in points.items() if p.kind == "ln" and not n.endswith(
        (".scale", ".normalized"))]
    missing += [f"{n}.scale" for n in norms if f"{n}.scale" not in points]
    if missing:
        raise UsageError("attribution_graph cannot freeze this model: it lacks the points "
                         + ", ".join(missing))
    gate_inputs = {source for source, _ in mlps}
    for d in dictionaries:
        if d.point in gate_inputs:
            raise UsageError(f"dictionary {d.name!r} reads {d.point!r}, an input of a frozen"
                             " MLP gate: not supported by attribution graphs")
    return _Freeze(tuple(patterns), tuple(scales), tuple(mlps))


def _add(probes: dict[str, list[Any]], point: str, fn: Any) -> None:
    probes.setdefault(point, []).append(fn)


def _record(model: Any, ids: torch.Tensor, dictionaries: list[_Dictionary], freeze: _Freeze,
            save: str) -> _Recorded:
    """The recording run: the prompt's values, kept in the scratch context's state."""
    probes: dict[str, list[Any]] = {}
    for point in (*freeze.patterns, *freeze.scales, "embed"):
        _add(probes, point, gl.record)
    for source, post in freeze.mlps:
        _add(probes, source, gl.record_mlp_in)
        _add(probes, post, gl.record_mlp_post)
    for d in dictionaries:
        _add(probes, d.part("features"), gl.record_features)
        _add(probes, d.part("error"), gl.record_error)
    _add(probes, "logits", gl.record_logits)
    model.run(ids[None], probes=probes, save=save, return_logits=False)
    saved = model.save_context(save)
    active = {}
    norms = {}
    for d in dictionaries:
        where = saved.fetch("active:" + d.part("features"))[0].numpy()
        values = saved.fetch("values:" + d.part("features"))[0].numpy()
        active[d.name] = (where[0], where[1], values)
        norms[d.name] = saved.fetch("norms:" + d.part("error"))[0].numpy()
    return _Recorded(active, norms, saved.fetch("logits")[0])


def _directions(model: Any, d: _Dictionary, features: Sequence[int]
                ) -> tuple[torch.Tensor, np.ndarray]:
    """``(n, d_in)`` encoder directions of ``features`` (times the input scale) and the
    constants their pre-activations add (``b_enc``, minus ``b_dec``'s share)."""
    index = [int(i) for i in features]
    if not index:
        return torch.zeros(0, 0), np.zeros(0)
    w = model.param(d.part("W_enc"), index=(slice(None), index)).T.double() * d.scale
    constant = model.param(d.part("b_enc"), index=index).double()
    if d.shift:
        constant = constant - model.param(d.part("b_dec")).double() @ w.T
    return w.float(), constant.numpy()


def _target_token(model: Any, target: Any, logits: torch.Tensor) -> int:
    if target is None:
        return int(logits.argmax())
    if isinstance(target, str):
        if model.tokenizer is None:
            raise UsageError("a target string needs a tokenizer: pass a token id")
        ids = model.tokenizer.encode(target, add_special_tokens=False)
        if len(ids) != 1:
            raise UsageError(f"target {target!r} is {len(ids)} tokens, not one: pass a token id")
        return int(ids[0])
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)) \
            or not 0 <= int(target) < logits.numel():
        raise UsageError(f"target must be None, a token string or a token id in [0,"
                         f" {logits.numel()}), not {target!r}")
    return int(target)


def _replay_probes(freeze: _Freeze, dictionaries: list[_Dictionary], edits: tuple[gl.Edit, ...],
                   zero: bool) -> dict[str, list[Any]]:
    """The probes of a run of the frozen model (with edits of its inputs, or all at zero)."""
    probes: dict[str, list[Any]] = {}
    for point in (*freeze.patterns, *freeze.scales):
        _add(probes, point, gl.frozen)
    for source, post in freeze.mlps:
        _add(probes, source, gl.stash_mlp_in)
        _add(probes, post, gl.frozen_gate)
    _add(probes, "embed", gl.edited_embedding(edits, zero))
    for d in dictionaries:
        _add(probes, d.part("features"), gl.frozen_features(d.name, edits, zero))
        _add(probes, d.part("error"), gl.frozen_error(d.name, edits, zero))
    return probes


# --------------------------------------------------------------------------- the layout
@dataclass
class _Layout:
    """Every candidate node, in the order of the adjacency being computed."""

    dictionaries: list[_Dictionary]
    recorded: _Recorded
    seq: int

    def __post_init__(self) -> None:
        self.offsets: dict[str, int] = {}
        n = 0
        for d in self.dictionaries:
            self.offsets[d.name] = n
            n += len(self.recorded.active[d.name][0])
        self.n_features = n
        self.error_offset = {d.name: n + k * self.seq for k, d in enumerate(self.dictionaries)}
        self.token_offset = n + len(self.dictionaries) * self.seq
        self.logit = self.token_offset + self.seq
        self.size = self.logit + 1

    def feature(self, g: int) -> tuple[_Dictionary, int]:
        """The dictionary of global feature ``g`` and its index among that one's actives."""
        for d in reversed(self.dictionaries):
            if g >= self.offsets[d.name]:
                return d, g - self.offsets[d.name]
        raise IndexError(g)


# --------------------------------------------------------------------------- one batch
def _run_targets(model: Any, ids: torch.Tensor, save: str, tag: str, layout: _Layout,
                 freeze: _Freeze, token: int, targets: list[int],
                 directions: dict[str, torch.Tensor], a: np.ndarray, values: dict[int, float]
                 ) -> None:
    """One backward pass computing the rows of ``targets`` (one per batch row)."""
    rows = len(targets)
    probes = _replay_probes(freeze, layout.dictionaries, (), False)
    by_dict: dict[str, list[tuple[int, int]]] = {}  # name -> (batch row, local feature)
    for r, t in enumerate(targets):
        if t != layout.logit:
            d, j = layout.feature(t)
            by_dict.setdefault(d.name, []).append((r, j))
    for d in layout.dictionaries:
        chosen = by_dict.get(d.name)
        if chosen:
            pos = layout.recorded.active[d.name][0]
            r_idx = torch.tensor([r for r, _ in chosen])
            j_idx = [j for _, j in chosen]
            _add(probes, d.point, gl.target(tag, d.name, r_idx, torch.as_tensor(pos[j_idx]),
                                            directions[d.name][j_idx], inject=True))
    _add(probes, "logits", gl.logit_value(tag, token))
    grads: dict[str, list[Any]] = {"embed": [gl.input_grads(tag, "gt", "embed")]}
    for d in layout.dictionaries:
        _add(grads, d.part("features"), gl.feature_grads(tag, d.name))
        _add(grads, d.part("error"), gl.input_grads(tag, f"ge:{d.name}", d.part("error")))
    coefficients = [1.0 if t == layout.logit else 0.0 for t in targets]
    model.run(ids[None].expand(rows, -1), probes=probes, grad_probes=grads, save=save,
              backward=gl.logit_objective(token, coefficients), return_logits=False)
    saved = model.save_context(save)
    targets_arr = np.asarray(targets)
    for d in layout.dictionaries:
        start = layout.offsets[d.name]
        n = len(layout.recorded.active[d.name][0])
        if n:
            a[targets_arr, start:start + n] = saved.fetch(f"{tag}:gf:{d.name}")[0].numpy()
        e = layout.error_offset[d.name]
        a[targets_arr, e:e + layout.seq] = saved.fetch(f"{tag}:ge:{d.name}")[0].numpy()
        if d.name in by_dict:
            s = saved.fetch(f"{tag}:s:{d.name}")[0].numpy()
            for (r, _), value in zip(by_dict[d.name], s, strict=True):
                values[targets[r]] = float(value)
    a[targets_arr, layout.token_offset:layout.logit] = saved.fetch(f"{tag}:gt")[0].numpy()
    logit = saved.fetch(f"{tag}:logit")[0].numpy()
    for r, t in enumerate(targets):
        if t == layout.logit:
            values[t] = float(logit[r])


def _biases(model: Any, ids: torch.Tensor, save: str, layout: _Layout, freeze: _Freeze,
            token: int, computed: list[int], directions: dict[str, torch.Tensor]
            ) -> dict[int, float]:
    """The frozen model's value of every computed target with every input node at zero."""
    probes = _replay_probes(freeze, layout.dictionaries, (), True)
    by_dict: dict[str, list[int]] = {}
    for t in computed:
        if t != layout.logit:
            d, j = layout.feature(t)
            by_dict.setdefault(d.name, []).append(j)
    for d in layout.dictionaries:
        js = by_dict.get(d.name)
        if js:
            pos = layout.recorded.active[d.name][0]
            _add(probes, d.point, gl.target("zero", d.name, torch.zeros(len(js), dtype=torch.long),
                                            torch.as_tensor(pos[js]), directions[d.name][js],
                                            inject=False))
    _add(probes, "logits", gl.logit_value("zero", token))
    model.run(ids[None], probes=probes, save=save, return_logits=False)
    saved = model.save_context(save)
    out = {layout.logit: float(saved.fetch("zero:logit")[0][0])}
    for d in layout.dictionaries:
        js = by_dict.get(d.name)
        if js:
            s = saved.fetch(f"zero:s:{d.name}")[0].numpy()
            for j, value in zip(js, s, strict=True):
                out[layout.offsets[d.name] + j] = float(value)
    return out


def _next_targets(a: np.ndarray, layout: _Layout, done: set[int], budget: int,
                  batch: int) -> list[int]:
    """The not yet computed features with the largest influence on the logit so far."""
    from cloche.experiments.graph import node_influence

    weights = np.zeros(layout.size)
    weights[layout.logit] = 1.0
    influence = node_influence(a, weights)[:layout.n_features]
    order = [int(g) for g in np.argsort(-influence, kind="stable") if int(g) not in done]
    return order[:min(batch, budget)]


# --------------------------------------------------------------------------- the graph
def _nodes(layout: _Layout, tokens: list[str], token_str: str, keep: list[int],
           values: dict[int, float], biases: dict[int, float],
           constants: dict[str, np.ndarray], logit: float) -> list[GraphNode]:
    rows = {d.name: k + 1 for k, d in enumerate(layout.dictionaries)}
    top = len(layout.dictionaries) + 1
    nodes = []
    for g in keep:
        if g < layout.n_features:
            d, j = layout.feature(g)
            pos, index, act = (x[j] for x in layout.recorded.active[d.name])
            value = values.get(g)
            nodes.append(GraphNode(
                f"feature:{d.name}:{int(pos)}:{int(index)}", "feature", int(pos), rows[d.name],
                d.layer, d.name, int(index), f"{d.name}#{int(index)}", float(act), value,
                biases.get(g), None if value is None else value + float(constants[d.name][j])))
        elif g < layout.token_offset:
            k, pos = divmod(g - layout.n_features, layout.seq)
            d = layout.dictionaries[k]
            nodes.append(GraphNode(f"error:{d.name}:{pos}", "error", pos, rows[d.name], d.layer,
                                   d.name, None, f"error {d.name}",
                                   float(layout.recorded.error_norms[d.name][pos])))
        elif g < layout.logit:
            pos = g - layout.token_offset
            nodes.append(GraphNode(f"token:{pos}", "token", pos, 0, None, None, None,
                                   tokens[pos]))
        else:
            nodes.append(GraphNode(f"logit:{token_str}", "logit", layout.seq - 1, top, None,
                                   None, None, token_str, logit, values.get(g), biases.get(g)))
    return nodes


@reports
def attribution_graph(model: Any, prompt: Any, target: Any = None, *,
                      dictionaries: Sequence[str] | str | None = None, keep: float = 0.8,
                      edge_keep: float = 0.98, max_nodes: int = 500, batch_size: int = 32,
                      progress: Any = True) -> AttributionGraph:
    """The attribution graph of ``prompt``'s next-token logit through the attached dictionaries.

    ``target``: the token whose logit (at the last position) is attributed — a token id, a
    one-token string, or None for the model's top prediction. ``dictionaries``: names (default:
    every attached one). ``max_nodes``: the most features computed as targets (chosen by
    influence when more are active). ``batch_size``: targets per backward pass. ``keep`` and
    ``edge_keep`` are the graph's default pruning fractions (``graph.prune()``); the graph
    returned is complete. See ``cloche.experiments.graph`` for what its nodes and edges are.
    """
    if isinstance(max_nodes, bool) or not isinstance(max_nodes, int) or max_nodes < 0:
        raise UsageError(f"max_nodes must be an int >= 0, not {max_nodes!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch_size must be a positive int, not {batch_size!r}")
    keep, edge_keep = check_fraction(keep, "keep"), check_fraction(edge_keep, "edge_keep")
    started = time.perf_counter()
    ids = _prompt_ids(model, prompt)
    chosen = _chosen(model, dictionaries)
    freeze = _freeze_plan(model, chosen)
    with scratch(model, "graph") as save:
        recorded = _record(model, ids, chosen, freeze, save)
        token = _target_token(model, target, recorded.logits)
        layout = _Layout(chosen, recorded, int(ids.numel()))
        directions, constants = {}, {}
        for d in chosen:
            features = recorded.active[d.name][1].tolist()
            directions[d.name], constants[d.name] = _directions(model, d, features)
        budget = min(layout.n_features, max_nodes)
        everything = layout.n_features <= max_nodes  # one queue; else the logit's row first
        target_passes = (math.ceil((budget + 1) / batch_size) if everything
                         else 1 + math.ceil(budget / batch_size))
        progress.expect(2 + target_passes, "pass")
        progress.step()
        a = np.zeros((layout.size, layout.size))
        values: dict[int, float] = {}
        done: set[int] = set()
        if everything:
            queue = [layout.logit, *range(layout.n_features)]
            batches = [queue[i:i + batch_size] for i in range(0, len(queue), batch_size)]
        else:
            batches = [[layout.logit]]
        runs = 0
        while batches:
            batch = batches.pop(0)
            _run_targets(model, ids, save, f"b{runs}", layout, freeze, token, batch,
                         directions, a, values)
            runs += 1
            progress.step()
            done.update(t for t in batch if t != layout.logit)
            if not batches and len(done) < budget:
                batches.append(_next_targets(a, layout, done, budget - len(done), batch_size))
        computed = sorted(done)
        biases = _biases(model, ids, save, layout, freeze, token, [*computed, layout.logit],
                         directions)
        progress.step()
    tokens = str_tokens(model, ids.tolist())
    token_str = str_tokens(model, [token])[0]
    keep_idx = list(range(layout.size))  # features not computed stay, as sources only
    probabilities = recorded.logits.double().softmax(-1)
    logit = float(recorded.logits[token])
    nodes = _nodes(layout, tokens, token_str, keep_idx, values, biases, constants, logit)
    info = {"linearisation": list(LINEARISATION),
            "frozen": {"patterns": len(freeze.patterns), "scales": len(freeze.scales),
                       "mlps": len(freeze.mlps)},
            "active_features": layout.n_features, "computed_features": len(computed),
            "backward_passes": runs, "seconds": time.perf_counter() - started,
            "model": model.name}
    target_info = {"token_id": token, "token": token_str, "logit": logit,
                   "probability": float(probabilities[token]),
                   "frozen_logit": values[layout.logit], "bias": biases[layout.logit]}
    described = {d.name: {"point": d.point, "out_point": d.out_point, "layer": d.layer,
                          "row": k + 1} for k, d in enumerate(chosen)}
    return AttributionGraph(prompt if isinstance(prompt, str) else None, ids.tolist(), tokens,
                            target_info, described, nodes, a,
                            keep, edge_keep, None, info)


# --------------------------------------------------------------------------- verification
def verify_edge(model: Any, graph: AttributionGraph, source: str, target: str,
                factor: float = -1.0) -> EdgeCheck:
    """See :meth:`AttributionGraph.verify_edge`."""
    src, tgt = graph.node(source), graph.node(target)
    if src.kind == "logit" or tgt.kind not in ("feature", "logit"):
        raise UsageError(f"an edge goes from a feature, error or token to a feature or the"
                         f" logit, not from {src.kind} to {tgt.kind}")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor == 0:
        raise UsageError(f"factor must be a nonzero number, not {factor!r}")
    weight = graph.weight(source, target)
    chosen = _chosen(model, list(graph.dictionaries))
    by_name = {d.name: d for d in chosen}
    freeze = _freeze_plan(model, chosen)
    ids = torch.tensor(graph.token_ids)
    with scratch(model, "graph-check") as save:
        recorded = _record(model, ids, chosen, freeze, save)
        if src.kind == "feature":
            assert src.dictionary is not None
            pos, index, act = recorded.active[src.dictionary]
            hit = np.flatnonzero((pos == src.position) & (index == src.feature))
            if not hit.size or not math.isclose(float(act[hit[0]]), src.activation or 0.0,
                                                rel_tol=1e-4, abs_tol=1e-6):
                raise UsageError(f"{source} is not active as in the graph: the model's"
                                 " dictionaries are not the graph's")
        kind = {"feature": "feature", "error": "error", "token": "token"}[src.kind]
        edits: tuple[gl.Edit, ...] = ((kind, src.dictionary, 1, src.position, src.feature,
                                       1.0 + float(factor)),)
        probes = _replay_probes(freeze, chosen, edits, False)
        if tgt.kind == "feature":
            assert tgt.dictionary is not None and tgt.feature is not None
            d = by_name[tgt.dictionary]
            w, _ = _directions(model, d, [tgt.feature])
            _add(probes, d.point, gl.target("check", d.name, torch.tensor([0, 1]),
                                            torch.tensor([tgt.position] * 2), w.expand(2, -1),
                                            inject=False))
            key = f"check:s:{d.name}"
        else:
            _add(probes, "logits", gl.logit_value("check", int(graph.target["token_id"])))
            key = "check:logit"
        model.run(ids[None].expand(2, -1), probes=probes, save=save, return_logits=False)
        measured = model.save_context(save).fetch(key)[0].numpy()
    return EdgeCheck(source, target, weight, float(factor), float(factor) * weight,
                     float(measured[1] - measured[0]))

