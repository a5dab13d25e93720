"""Results that show themselves in a notebook: small, dependency-free HTML for Jupyter.

Jupyter calls ``_repr_html_`` on the last value of a cell; head-score grids, patching grids and
dataset examples use the helpers here, so they read alike: a caption that says what the result
is, a compact table, and grids shaded from white (low) to blue (high) with the value printed.
Everything user-provided (tokens, contexts) is escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["grid", "marked_context", "table"]

_STYLE = ("border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px;"
          "margin:4px 0")
_CELL = "border:1px solid #ddd;padding:2px 6px;text-align:right"


def _caption(text: str) -> str:
    return (f"<caption style='caption-side:top;text-align:left;font-weight:600;"
            f"padding-bottom:4px'>{html.escape(text)}</caption>")


def grid(values: np.ndarray, *, caption: str, rows: Sequence[Any], columns: Sequence[Any],
         row_label: str = "", fmt: str = "{:.2f}") -> str:
    """A 2-d array as a shaded table: each cell's blue grows with its value (NaN: blank)."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    span = (high - low) or 1.0
    head = "".join(f"<th style='{_CELL}'>{html.escape(str(c))}</th>" for c in columns)
    body = []
    for label, row in zip(rows, values, strict=True):
        cells = []
        for v in row:
            if not np.isfinite(v):
                cells.append(f"<td style='{_CELL}'></td>")
                continue
            shade = (v - low) / span
            colour = f"rgba(37,99,235,{0.85 * shade:.2f})"
            ink = "#fff" if shade > 0.6 else "#000"
            cells.append(f"<td style='{_CELL};background:{colour};color:{ink}'>"
                         f"{html.escape(fmt.format(v))}</td>")
        body.append(f"<tr><th style='{_CELL}'>{html.escape(str(label))}</th>{''.join(cells)}"
                    "</tr>")
    return (f"<table style='{_STYLE}'>{_caption(caption)}<tr><th style='{_CELL}'>"
            f"{html.escape(row_label)}</th>{head}</tr>{''.join(body)}</table>")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str,
          raw_columns: Sequence[int] = ()) -> str:
    """A plain table; columns listed in ``raw_columns`` hold HTML made by this module."""
    head = "".join(f"<th style='{_CELL}'>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = [str(v) if i in raw_columns else html.escape(str(v)) for i, v in enumerate(row)]
        body.append("<tr>" + "".join(f"<td style='{_CELL};text-align:left'>{c}</td>"
                                     for c in cells) + "</tr>")
    return (f"<table style='{_STYLE}'>{_caption(caption)}<tr>{head}</tr>{''.join(body)}"
            "</table>")


def marked_context(tokens: Sequence[str], peak: int) -> str:
    """Tokens as HTML with the peak token highlighted (whitespace kept visible)."""
    parts = []
    for i, token in enumerate(tokens):
        text = html.escape(token).replace("\n", "\u21b5")
        if i == peak:
            text = f"<b style='background:#fde68a'>{text}</b>"
        parts.append(text)
    return "<span style='white-space:pre'>" + "".join(parts) + "</span>"
