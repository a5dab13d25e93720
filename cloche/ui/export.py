"""A unit (or feature) page as one self-contained HTML file: no server, no external URLs.

The file holds the page's data (JSON in a ``<script type="application/json">``), the style
sheet and the same scripts that draw the live page (``static/plots.js``, ``dom.js``,
``unit_view.js``) joined into one inline module, so it opens from ``file://`` and shows exactly
what the live page showed. ``export_unit_page`` computes and writes one; the live page's Export
link (``/api/unit/export``) serves the same file from the page's cached data.
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

from cloche.errors import UsageError
from cloche.ui.jsonsafe import clean
from cloche.ui.views._units import Unit
from cloche.ui.views.unit import unit_page

__all__ = ["export_unit_page", "unit_page_html"]

STATIC = resources.files("cloche.ui") / "static"
#: the scripts the file inlines, in dependency order
SCRIPTS = ("plots.js", "dom.js", "unit_view.js")

_BOOT = """
const data = JSON.parse(document.getElementById("cloche-data").textContent);
const main = document.getElementById("main");
document.title = unitTitle(data) + " · " + data.model + " · cloche";
main.replaceChildren(el("h1", {}, unitTitle(data)));
renderUnit(main, data, { live: false });
document.body.dataset.ready = "1";
"""


def _bundle() -> str:
    """The scripts as one module: their imports dropped (all are in it), exports made local."""
    parts = []
    for name in SCRIPTS:
        text = (STATIC / name).read_text(encoding="utf-8")
        text = re.sub(r"^import .*?;\n", "", text, flags=re.M)
        parts.append(f"// ---- {name}\n" + re.sub(r"^export ", "", text, flags=re.M))
    return "\n".join(parts) + _BOOT


def unit_page_html(data: dict[str, Any]) -> str:
    """The self-contained HTML file for the unit page's data (as ``unit_page`` returns it)."""
    payload = json.dumps(clean(data), allow_nan=False).replace("<", "\\u003c")
    style = (STATIC / "style.css").read_text(encoding="utf-8")
    script = _bundle().replace("</script", "<\\/script")
    title = html.escape(f"{data['point']} · {data['model']} · cloche")
    model = html.escape(str(data["model"]))
    return (f'<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{title}</title>\n<link rel="icon" href="data:,">\n'
            f'<style>\n{style}</style>\n</head>\n<body>\n<header>\n'
            f'  <span class="brand">cloche</span>\n'
            f'  <span id="model-name" data-testid="model-name">{model}</span>\n'
            f'  <span class="muted" data-testid="exported">exported page</span>\n</header>\n'
            f'<main id="main"><p class="muted">loading…</p></main>\n'
            f'<script type="application/json" id="cloche-data">{payload}</script>\n'
            f'<script type="module">\n{script}</script>\n</body>\n</html>\n')


def export_unit_page(model: Any, point: str, unit: int | Sequence[float],
                     path: str | os.PathLike[str], *, dataset: str = "default:heldout",
                     limit: int | None = 512) -> pathlib.Path:
    """Compute the unit page of ``unit`` (an index, or a direction as floats) at ``point`` —
    a dictionary's ``dict:<name>:features`` included — over ``dataset`` and write it to
    ``path`` as one HTML file that needs no server. Returns the path written."""
    if isinstance(unit, bool):
        raise UsageError("unit is an int index or a sequence of floats, not a bool")
    if isinstance(unit, int):
        if unit < 0:
            raise UsageError(f"unit must be >= 0, not {unit}")
        which = Unit(index=unit)
    else:
        try:
            which = Unit(direction=tuple(float(v) for v in unit))
        except (TypeError, ValueError):
            raise UsageError("unit is an int index or a sequence of floats") from None
    data = unit_page(model, point, which, dataset, limit=limit)
    target = pathlib.Path(path)
    target.write_text(unit_page_html(data), encoding="utf-8")
    return target
