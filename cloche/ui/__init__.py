"""The web UI: look at a model in a browser (``cloche ui``, ``cloche serve --ui``).

Built only on the public API (``cloche.Model``, ``cloche.experiments``, save contexts and
reducers), so it works the same on a model loaded here, on a server and on a sharded server.
``views`` computes each page's data, ``app`` serves it (Starlette), ``security`` guards it,
``launch`` runs it (uvicorn) and ``static`` draws it (plain JavaScript and SVG, no build step);
``export`` writes a unit or feature page as one HTML file that needs no server.
"""

from cloche.ui.export import export_unit_page, unit_page_html
from cloche.ui.launch import UIServer, start_ui

__all__ = ["UIServer", "export_unit_page", "start_ui", "unit_page_html"]
