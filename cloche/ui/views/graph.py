"""The graph view: the pruned attribution graph of one prompt through the attached dictionaries.

The graph is computed once per (dictionaries, prompt, target, node budget) and pruned per
(keep, edge_keep), both cached by the backend; the page draws the pruned graph (nodes by
dictionary row x position, edges coloured by sign, width by weight) and offers it as JSON —
the same document ``AttributionGraph.to_json`` writes, so ``AttributionGraph.from_json`` reads
a download back.
"""

from __future__ import annotations

from typing import Any

import cloche
from cloche.errors import UsageError

__all__ = ["MAX_GRAPH_TOKENS", "full_graph", "graph_page"]

MAX_GRAPH_TOKENS = 64  # one backward pass per batch of targets: keep pages quick


def full_graph(model: Any, prompt: str, target: str | None, max_nodes: int) -> Any:
    """The complete graph (every computed target), from the public experiment."""
    if not prompt:
        raise UsageError("type a prompt")
    if not model.dictionaries():
        raise UsageError("no dictionary is attached: attribution graphs run through"
                         " dictionaries (model.attach_dictionary(...))")
    ids = model.tokenize(prompt)
    if ids.numel() > MAX_GRAPH_TOKENS:
        raise UsageError(f"the prompt has {ids.numel()} tokens; the graph view takes at most"
                         f" {MAX_GRAPH_TOKENS}")
    token: Any = None
    if target:
        token = int(target) if target.strip().isdigit() else target
    return cloche.experiments.attribution_graph(model, prompt, token, max_nodes=max_nodes,
                                                progress=False)


def graph_page(full: Any, keep: float, edge_keep: float) -> dict[str, Any]:
    """The pruned graph as the page draws it (the JSON document) plus the full graph's size."""
    pruned = full.prune(keep, edge_keep)
    return {"graph": pruned.to_dict(),
            "full": {"nodes": len(full), "edges": full.n_edges,
                     "features": len(full.features())}}
