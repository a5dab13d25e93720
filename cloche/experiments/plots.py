"""Small matplotlib helpers for experiment results; each returns the Axes it drew on.

A notebook displays the figure directly; scripts call ``ax.figure.savefig(path)``. matplotlib
is imported inside each function (it is in the ``experiments`` extra), so importing
``cloche.experiments`` never needs it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cloche.errors import UsageError

__all__ = ["activation_histogram", "attention_pattern", "connectivity_graph", "head_scores",
           "patching_grid", "pca_scatter", "token_heatmap"]


def _axes(ax: Any, size: tuple[float, float]) -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UsageError("plots need matplotlib: pip install 'cloche[experiments]'") from exc
    if ax is None:
        _, ax = plt.subplots(figsize=size)
    return ax


def _visible(token: str) -> str:
    return token.replace("\n", "\\n").replace("\t", "\\t") or " "


def token_heatmap(tokens: list[str], values: Any, *, ax: Any = None, cmap: str = "RdBu_r",
                  title: str | None = None, width: int = 80) -> Any:
    """Tokens laid out as the text they spell (lines break at newlines and at ``width``
    characters), each on a background coloured by its value (0 is white)."""
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    values = np.asarray(values, dtype=float).reshape(-1)
    if len(values) != len(tokens):
        raise UsageError(f"{len(tokens)} tokens but {len(values)} values")
    placed, col, row = [], 0, 0
    for tok, v in zip(tokens, values, strict=True):
        text = _visible(tok.replace("\n", "")) if tok.strip("\n") else _visible(tok)
        if col and col + len(text) > width:
            col, row = 0, row + 1
        placed.append((col, row, text, v))
        col += len(text) + 1
        if "\n" in tok:
            col, row = 0, row + 1
    lines = row + 1
    ax = _axes(ax, (min(16, 0.11 * width + 1), 0.35 * lines + 1))
    bound = float(np.abs(values).max()) or 1.0
    norm = mcolors.Normalize(-bound, bound)
    colormap = plt.get_cmap(cmap)
    for col, row, text, v in placed:
        ax.text(col, -row, text, ha="left", va="center", fontsize=9, family="monospace",
                bbox={"facecolor": colormap(norm(v)), "edgecolor": "none", "pad": 1.5})
    ax.set_xlim(-1, width + 1)
    ax.set_ylim(-lines + 0.5, 0.5)
    ax.axis("off")
    ax.figure.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, shrink=0.6)
    if title:
        ax.set_title(title)
    return ax


def head_scores(scores: Any, *, ax: Any = None, title: str = "head scores") -> Any:
    """(n_layers, n_heads) table as a heatmap with the values written in."""
    scores = np.asarray(scores, dtype=float)
    ax = _axes(ax, (1 + 0.8 * scores.shape[1], 1 + 0.6 * scores.shape[0]))
    im = ax.imshow(scores, cmap="viridis", vmin=0, vmax=max(1e-9, float(np.nanmax(scores))))
    for (i, j), v in np.ndenumerate(scores):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.5 * np.nanmax(
            scores) else "k", fontsize=8)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(scores.shape[1]))
    ax.set_yticks(range(scores.shape[0]))
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax


def attention_pattern(pattern: Any, tokens: list[str], *, ax: Any = None,
                      title: str = "attention") -> Any:
    """One head's (query, key) pattern with the tokens on both axes."""
    pattern = np.asarray(pattern, dtype=float)
    n = len(tokens)
    ax = _axes(ax, (2 + 0.3 * n, 2 + 0.3 * n))
    ax.imshow(pattern, cmap="Blues", vmin=0, vmax=1)
    labels = [_visible(t) for t in tokens]
    ax.set_xticks(range(n), labels, rotation=90, fontsize=7, family="monospace")
    ax.set_yticks(range(n), labels, fontsize=7, family="monospace")
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title)
    return ax


def patching_grid(result: Any, *, ax: Any = None, normalized: bool = True) -> Any:
    """A :class:`~cloche.experiments.patching.PatchResult` as a layer × position/head map."""
    grid = result.normalized if normalized else result.grid
    ax = _axes(ax, (2 + 0.5 * grid.shape[1], 1.5 + 0.5 * grid.shape[0]))
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    im = ax.imshow(grid, cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    if result.kind == "heads":
        ax.set_xticks(range(grid.shape[1]))
        ax.set_xlabel("head")
    else:
        ax.set_xticks(range(grid.shape[1]), [_visible(result.tokens[c]) if c < len(result.tokens)
                                             else str(c) for c in result.columns],
                      rotation=90, family="monospace", fontsize=8)
        ax.set_xlabel("position")
    ax.set_yticks(range(grid.shape[0]))
    ax.set_ylabel("layer")
    ax.set_title(f"patching {result.kind}" + (" (normalized)" if normalized else ""))
    ax.figure.colorbar(im, ax=ax, shrink=0.8)
    return ax


def pca_scatter(points: Any, *, colors: Any = None, ax: Any = None, title: str = "PCA",
                labels: tuple[str, str] = ("PC1", "PC2")) -> Any:
    """A 2-D scatter of projections (PCA or UMAP), optionally coloured by a value per point."""
    points = np.asarray(points, dtype=float).reshape(-1, np.shape(points)[-1])
    ax = _axes(ax, (5, 4.5))
    sc = ax.scatter(points[:, 0], points[:, 1], c=colors, s=6, cmap="viridis", alpha=0.7)
    if colors is not None:
        ax.figure.colorbar(sc, ax=ax, shrink=0.8)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(title)
    return ax


def activation_histogram(stats: Any, *, ax: Any = None, title: str = "activations",
                         log: bool = True) -> Any:
    """A :class:`~cloche.experiments.units.UnitStats` histogram."""
    ax = _axes(ax, (5, 3))
    edges = np.asarray(stats.edges)
    ax.bar(edges[:-1], stats.counts, width=np.diff(edges), align="edge", color="tab:blue")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("activation")
    ax.set_ylabel("tokens")
    ax.set_title(f"{title} (mean {stats.mean:.3f}, std {stats.std:.3f})")
    return ax


def connectivity_graph(summary: dict[str, Any], *, ax: Any = None, min_weight: float = 0.0,
                       title: str = "connectivity") -> Any:
    """:func:`~cloche.experiments.connectivity.connectivity_summary` drawn as a layered graph:
    components left to right by depth, edge width and darkness by weight."""
    depth = summary["layers"]
    ax = _axes(ax, (2 + 1.6 * len(set(depth.values())), 4))
    columns: dict[float, list[str]] = {}
    for name in summary["nodes"]:
        columns.setdefault(depth[name], []).append(name)
    pos = {}
    for x, d in enumerate(sorted(columns)):
        names = columns[d]
        for k, name in enumerate(names):
            pos[name] = (x, (k - (len(names) - 1) / 2) + (0.35 if name.endswith("mlp") else 0))
    edges = [e for e in summary["edges"] if e[2] >= min_weight]
    low = min((e[2] for e in edges), default=0.0)
    span = (max((e[2] for e in edges), default=1.0) - low) or 1.0
    for src, dst, w in edges:
        (x0, y0), (x1, y1) = pos[src], pos[dst]
        strength = (w - low) / span  # 0 for the weakest edge shown, 1 for the strongest
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops={"arrowstyle": "-|>", "lw": 0.3 + 4 * strength,
                                "color": (0, 0, 0, 0.1 + 0.9 * strength),
                                "connectionstyle": "arc3,rad=0.15"})
    for name, (x, y) in pos.items():
        ax.text(x, y, name, ha="center", va="center", fontsize=9,
                bbox={"facecolor": "lightyellow", "edgecolor": "gray", "boxstyle": "round"})
    ax.set_xlim(-0.7, len(columns) - 0.3)
    ax.set_ylim(-1.5, 1.5)
    ax.axis("off")
    ax.set_title(title)
    return ax
