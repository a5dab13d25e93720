"""An attribution graph as data: nodes, direct-effect edges, pruning and JSON.

:func:`cloche.experiments.attribution_graph` computes one (``graph_attribution.py``); this
module only holds and transforms it, so a graph loaded from JSON works without a model.

Nodes, in the adjacency's order (circuit-tracer's): the active dictionary features
(``feature:<dict>:<pos>:<index>``; those not computed as targets, beyond ``max_nodes``, are
sources only: no ``value``, an empty row), one error node per dictionary and position
(``error:<dict>:<pos>``), one embedding node per token (``token:<pos>``), and the output logit
(``logit:<token id>``). ``adjacency[t, s]`` is the direct effect of source ``s`` on target ``t``
in the frozen model: for a feature source its activation times the gradient of the target
through the frozen model; for an error or a token the dot product of the vector with that
gradient. A target's value is then the sum of its row plus its ``bias`` (the frozen model's
value with every input at zero).

Pruning follows circuit-tracer: influence on the logit is propagated through the row-normalised
absolute adjacency (``w @ (A + A^2 + ...)``); the nodes carrying ``keep`` of the total influence
are kept (tokens and the logit always), then the edges carrying ``edge_keep`` of the total edge
score among them, then nodes left without outgoing (features, errors) or incoming (features)
edges are dropped until nothing changes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from cloche.errors import UsageError

__all__ = ["FORMAT", "AttributionGraph", "EdgeCheck", "GraphNode", "check_fraction",
           "node_influence"]

FORMAT = "cloche-attribution-graph"
VERSION = 1
KINDS = ("feature", "error", "token", "logit")


@dataclass(frozen=True)
class GraphNode:
    """One node. ``row`` is its row in a drawing (0: tokens, then the dictionaries in forward
    order, last: the logit); ``layer`` the model layer of its dictionary's point."""

    id: str
    kind: str
    position: int
    row: int
    layer: int | None = None
    dictionary: str | None = None
    feature: int | None = None
    label: str = ""
    #: a feature's activation; an error's norm; the logit's value
    activation: float | None = None
    #: a computed target's attributed value: a feature's pre-activation without its constant
    #: (``<x, w_enc>``), or the logit (frozen model); None for pure sources
    value: float | None = None
    #: the frozen model's value of the target with every input node at zero
    bias: float | None = None
    #: a feature's pre-activation (``value`` plus the encoder's constant)
    pre_activation: float | None = None
    influence: float | None = None


@dataclass(frozen=True)
class EdgeCheck:
    """An edge against an explicit intervention on the frozen model: the source scaled by
    ``factor`` (every other input held), the target measured before and after."""

    source: str
    target: str
    weight: float
    factor: float
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """``|measured - predicted| / |predicted|`` (absolute when nothing was predicted)."""
        gap = abs(self.measured - self.predicted)
        return gap / abs(self.predicted) if self.predicted else gap


def _normalized(a: np.ndarray) -> np.ndarray:
    absolute = np.abs(a)
    return absolute / np.maximum(absolute.sum(axis=1, keepdims=True), 1e-10)


def _propagate(n: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``weights @ (n + n^2 + ...)``; the graph is acyclic, so the series ends."""
    current = weights @ n
    total = current.copy()
    for _ in range(n.shape[0]):
        if not current.any():
            return total
        current = current @ n
        total += current
    raise UsageError("the attribution graph has a cycle")


def node_influence(adjacency: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Each node's total influence on the weighted targets (circuit-tracer's measure)."""
    return _propagate(_normalized(adjacency), weights)


def _threshold(scores: np.ndarray, keep: float) -> float:
    """The smallest score among the fewest largest scores whose sum reaches ``keep`` of all."""
    ordered = np.sort(scores.ravel())[::-1]
    total = ordered.sum()
    if total <= 0:
        return np.inf
    cumulative = np.cumsum(ordered) / total
    index = min(int(np.searchsorted(cumulative, keep)), len(ordered) - 1)
    return float(ordered[index])


def check_fraction(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UsageError(f"{what} must be a fraction in [0, 1], not {value!r}")
    return float(value)


@dataclass(eq=False)  # (an adjacency matrix has no single truth value: compare to_json())
class AttributionGraph:
    """A feature-to-feature attribution graph for one prompt (see the module docstring).

    ``target``: the logit's token (``token_id``, ``token``, ``logit`` (the model's),
    ``probability``). ``dictionaries``: name -> ``point``, ``layer``, ``row``. ``keep`` and
    ``edge_keep`` are :meth:`prune`'s defaults; ``pruning`` says what a pruned graph kept.
    """

    prompt: str | None
    token_ids: list[int]
    tokens: list[str]
    target: dict[str, Any]
    dictionaries: dict[str, dict[str, Any]]
    nodes: list[GraphNode]
    adjacency: np.ndarray
    keep: float = 0.8
    edge_keep: float = 0.98
    pruning: dict[str, Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.adjacency = np.asarray(self.adjacency, dtype=np.float64)
        n = len(self.nodes)
        if self.adjacency.shape != (n, n):
            raise UsageError(f"an attribution graph of {n} nodes needs a ({n}, {n}) adjacency,"
                             f" not {self.adjacency.shape}")
        self._index = {node.id: i for i, node in enumerate(self.nodes)}
        if len(self._index) != n:
            raise UsageError("attribution graph node ids must be unique")

    # ----------------------------------------------------------------- lookup
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[GraphNode]:
        return iter(self.nodes)

    def index(self, node: str | GraphNode) -> int:
        key = node.id if isinstance(node, GraphNode) else node
        try:
            return self._index[key]
        except KeyError:
            raise UsageError(f"no node {key!r} in this attribution graph") from None

    def node(self, node: str) -> GraphNode:
        return self.nodes[self.index(node)]

    @property
    def logit(self) -> GraphNode:
        return self.nodes[-1]

    def weight(self, source: str, target: str) -> float:
        """The direct effect of ``source`` on ``target`` (0.0 when there is no edge)."""
        return float(self.adjacency[self.index(target), self.index(source)])

    def edges(self) -> list[tuple[str, str, float]]:
        """``(source, target, weight)`` for every nonzero edge, largest ``|weight|`` first."""
        targets, sources = np.nonzero(self.adjacency)
        weights = self.adjacency[targets, sources]
        order = np.argsort(-np.abs(weights), kind="stable")
        return [(self.nodes[sources[i]].id, self.nodes[targets[i]].id, float(weights[i]))
                for i in order]

    @property
    def n_edges(self) -> int:
        return int(np.count_nonzero(self.adjacency))

    def features(self) -> list[GraphNode]:
        return [n for n in self.nodes if n.kind == "feature"]

    # ----------------------------------------------------------------- analysis
    def _logit_weights(self) -> np.ndarray:
        weights = np.zeros(len(self.nodes))
        weights[-1] = 1.0
        return weights

    def influence(self) -> np.ndarray:
        """Every node's influence on the logit (:func:`node_influence`), in node order."""
        return node_influence(self.adjacency, self._logit_weights())

    def completeness(self) -> dict[str, float]:
        """For every computed target: its value minus (its row's sum plus its bias) — zero up
        to rounding when the frozen model is linear, which is what the graph claims."""
        out = {}
        for i, node in enumerate(self.nodes):
            if node.value is not None and node.bias is not None:
                out[node.id] = node.value - (float(self.adjacency[i].sum()) + node.bias)
        return out

    # ----------------------------------------------------------------- pruning
    def prune(self, keep: float | None = None, edge_keep: float | None = None
              ) -> AttributionGraph:
        """The subgraph carrying ``keep`` of the influence on the logit (nodes) and
        ``edge_keep`` of the edge scores among them (circuit-tracer's two thresholds).

        ``pruning`` then says what was kept: ``node_fraction`` (the influence of the nodes
        the threshold chose, at least ``keep``), ``edge_fraction`` (of the edge scores, at
        least ``edge_keep``) and ``retained_fraction`` (the influence of the nodes left in
        the end, tokens included, after nodes without edges were dropped).
        """
        keep = check_fraction(self.keep if keep is None else keep, "keep")
        edge_keep = check_fraction(self.edge_keep if edge_keep is None else edge_keep,
                                    "edge_keep")
        a = self.adjacency
        weights = self._logit_weights()
        influence = node_influence(a, weights)
        kinds = np.array([n.kind for n in self.nodes])
        always = (kinds == "token") | (kinds == "logit")
        chosen = influence >= _threshold(influence, keep)
        total = influence.sum()
        node_fraction = float(influence[chosen].sum() / total) if total else 1.0
        node_mask = chosen | always
        pruned = a.copy()
        pruned[~node_mask] = 0
        pruned[:, ~node_mask] = 0
        normalized = _normalized(pruned)
        scores = normalized * (_propagate(normalized, weights) + weights)[:, None]
        edge_mask = (scores >= _threshold(scores, edge_keep)) & (pruned != 0)
        edge_fraction = float(scores[edge_mask].sum() / scores.sum()) if scores.sum() else 1.0
        sources = (kinds == "feature") | (kinds == "error")
        features = kinds == "feature"
        while True:
            before = node_mask.copy()
            edge_mask[~node_mask] = False
            edge_mask[:, ~node_mask] = False
            node_mask[sources] &= edge_mask[:, sources].any(axis=0)
            node_mask[features] &= edge_mask[features].any(axis=1)
            if np.array_equal(before, node_mask):
                break
        keep_idx = np.flatnonzero(node_mask)
        kept = np.where(edge_mask, a, 0.0)[np.ix_(keep_idx, keep_idx)]
        nodes = [replace(self.nodes[i], influence=float(influence[i])) for i in keep_idx]
        retained = float(influence[node_mask].sum() / total) if total else 1.0
        pruning = {"keep": keep, "edge_keep": edge_keep, "node_fraction": node_fraction,
                   "edge_fraction": edge_fraction, "retained_fraction": retained,
                   "nodes_before": len(self.nodes), "edges_before": self.n_edges,
                   "nodes": len(nodes), "edges": int(np.count_nonzero(kept))}
        return AttributionGraph(self.prompt, list(self.token_ids), list(self.tokens),
                                dict(self.target), dict(self.dictionaries), nodes, kept,
                                keep, edge_keep, pruning, dict(self.info))

    # ----------------------------------------------------------------- verification
    def verify_edge(self, model: Any, source: str, target: str, factor: float = -1.0
                    ) -> EdgeCheck:
        """Check one edge by an explicit intervention on ``model``'s frozen model: scale the
        source by ``1 + factor`` (default: remove it) with every other input held, measure the
        target's change; the edge predicts ``factor * weight``."""
        from cloche.experiments.graph_attribution import verify_edge

        return verify_edge(model, self, source, target, factor)

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "prompt": self.prompt,
                "token_ids": list(self.token_ids), "tokens": list(self.tokens),
                "target": dict(self.target), "dictionaries": dict(self.dictionaries),
                "keep": self.keep, "edge_keep": self.edge_keep, "pruning": self.pruning,
                "info": dict(self.info), "nodes": [asdict(n) for n in self.nodes],
                "edges": [{"source": s, "target": t, "weight": w} for s, t, w in self.edges()]}

    def to_json(self, indent: int | None = None) -> str:
        """The graph as JSON (nodes, edges as ``{source, target, weight}``, the rest)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttributionGraph:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UsageError(f"not a {FORMAT} document")
        if data.get("version") != VERSION:
            raise UsageError(f"attribution graph version {data.get('version')!r} is not"
                             f" {VERSION}")
        try:
            nodes = [GraphNode(**n) for n in data["nodes"]]
            index = {n.id: i for i, n in enumerate(nodes)}
            adjacency = np.zeros((len(nodes), len(nodes)))
            for edge in data["edges"]:
                adjacency[index[edge["target"]], index[edge["source"]]] = float(edge["weight"])
            return cls(data["prompt"], list(data["token_ids"]), list(data["tokens"]),
                       dict(data["target"]), dict(data["dictionaries"]), nodes, adjacency,
                       float(data["keep"]), float(data["edge_keep"]), data.get("pruning"),
                       dict(data.get("info") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise UsageError(f"malformed attribution graph: {exc!r}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> AttributionGraph:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise UsageError(f"an attribution graph is JSON: {exc}") from exc
        return cls.from_dict(data)

    # ----------------------------------------------------------------- display
    def __repr__(self) -> str:
        counts = {k: sum(n.kind == k for n in self.nodes) for k in KINDS}
        state = "" if self.pruning is None else f", pruned to keep={self.pruning['keep']}"
        return (f"AttributionGraph({counts['feature']} features, {counts['error']} errors,"
                f" {counts['token']} tokens -> logit {self.target.get('token')!r};"
                f" {self.n_edges} edges{state})")

    def _repr_html_(self) -> str:
        from html import escape

        rows = "".join(f"<tr><td>{escape(s)}</td><td>{escape(t)}</td><td>{w:+.4f}</td></tr>"
                       for s, t, w in self.edges()[:20])
        return (f"<p>{escape(repr(self))}</p><table><tr><th>source</th><th>target</th>"
                f"<th>direct effect</th></tr>{rows}</table>")
