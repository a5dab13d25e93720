"""Small HTML tables for Jupyter's ``_repr_html_``, in the style of ``cloche.experiments.html``
(the same table and cell styles, which a test keeps equal): save-context listings and handles
show themselves as the experiments' results do. Everything user-provided is escaped."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["human_bytes", "table"]

_STYLE = ("border-collapse:collapse;font-family:ui-monospace,monospace;font-size:12px;"
          "margin:4px 0")
_CELL = "border:1px solid #ddd;padding:2px 6px;text-align:right"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, caption: str,
          note: str = "") -> str:
    """A captioned table of escaped cells (numbers right-aligned, text left), and a note."""
    head = "".join(f"<th style='{_CELL}'>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = [f"<td style='{_CELL}{'' if isinstance(v, (int, float)) else ';text-align:left'}'>"
                 f"{html.escape(str(v))}</td>" for v in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    below = (f"<div style='font-family:ui-monospace,monospace;font-size:11px;color:#555'>"
             f"{html.escape(note)}</div>") if note else ""
    return (f"<table style='{_STYLE}'><caption style='caption-side:top;text-align:left;"
            f"font-weight:600;padding-bottom:4px'>{html.escape(caption)}</caption>"
            f"<tr>{head}</tr>{''.join(body)}</table>{below}")


def human_bytes(n: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
