"""The web app: page routes (one HTML shell; the state lives in the URL) and JSON routes.

Every page is the same small HTML document naming the model; ``static/app.js`` reads the path
and query, asks the matching ``/api/...`` route for data and draws it (SVG, in the browser).
Long computations (the unit page) answer as a stream of JSON lines — progress, then the result
— so the page shows progress and can cancel (``POST /api/jobs/{id}/cancel``, or by closing the
connection). Starlette (routing, responses, static files) under uvicorn; :class:`Guard` wraps it.
"""

from __future__ import annotations

import asyncio
import html
import json
import math
import re
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from cloche.errors import Cancelled, ClocheError, UsageError
from cloche.ui.backend import Backend
from cloche.ui.export import unit_page_html
from cloche.ui.jsonsafe import clean as _clean
from cloche.ui.security import Guard
from cloche.ui.views import contexts as contexts_view
from cloche.ui.views import graph as graph_view
from cloche.ui.views import head as head_view
from cloche.ui.views import intervene as intervene_view
from cloche.ui.views import model as model_view
from cloche.ui.views import text as text_view
from cloche.ui.views import unit as unit_view
from cloche.ui.views._units import parse_unit

__all__ = ["PAGES", "build_app"]

PAGES = ("model", "unit", "text", "intervene", "contexts", "head", "graph")
STATIC = resources.files("cloche.ui") / "static"


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(_clean(value), status_code=status)


def _error(exc: BaseException) -> JSONResponse:
    return _json({"error": str(exc), "kind": type(exc).__name__}, 400)


def _int(request: Request, name: str, default: int | None = None, *, low: int = 0,
         high: int = 1 << 20) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        if default is None:
            raise UsageError(f"{name} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be an int, not {raw!r}") from None
    if not low <= value <= high:
        raise UsageError(f"{name} must lie in [{low}, {high}], not {value}")
    return value


def _float(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name} must be a number, not {raw!r}") from None
    if not math.isfinite(value):
        raise UsageError(f"{name} must be finite")
    return value


def _optional_int(request: Request, name: str) -> int | None:
    return None if request.query_params.get(name) in (None, "") else _int(request, name)


def _passes(progress: Callable[[dict[str, Any]], None], passes: int
            ) -> Callable[[dict[str, Any]], None]:
    """Progress over several dataset passes as one fraction (a pass restarts ``done``)."""
    state = {"pass": 0, "last": 0}

    def report(event: dict[str, Any]) -> None:
        if event.get("type") != "progress" or not event.get("total"):
            return
        if event["done"] < state["last"]:
            state["pass"] += 1
        state["last"] = event["done"]
        stage = min(state["pass"], passes - 1)
        progress({"stage": f"pass {stage + 1} of {passes}", "done": event["done"],
                  "total": event["total"],
                  "fraction": (stage + event["done"] / event["total"]) / passes})

    return report


def build_app(backend: Backend, token: str, host: str = "127.0.0.1") -> Guard:
    """The ASGI app for ``backend``, behind the :class:`Guard` holding ``token``."""
    shell = (STATIC / "index.html").read_text(encoding="utf-8")

    async def page(request: Request) -> Response:
        title = html.escape(backend.name)
        body = shell.replace("{{model}}", title)
        return HTMLResponse(body, headers={"cache-control": "no-store"})

    async def root(request: Request) -> Response:
        return await page(request)

    async def blocking(fn: Callable[[], Any]) -> Response:
        try:
            return _json(await anyio.to_thread.run_sync(fn))
        except ClocheError as exc:
            return _error(exc)

    async def api_model(request: Request) -> Response:
        def compute() -> Any:  # attaching a dictionary changes the page
            return backend.compute(("model", tuple(sorted(backend.model.dictionaries()))),
                                   model_view.model_page)

        return await blocking(compute)

    def unit_args(request: Request) -> tuple[str, Any, str, int]:
        point = request.query_params.get("point") or ""
        if not point:
            raise UsageError("point is required")
        unit = parse_unit(request.query_params.get("unit"), request.query_params.get("direction"))
        dataset = request.query_params.get("dataset") or backend.dataset
        limit = _int(request, "limit", backend.limit, low=1)
        return point, unit, dataset, limit

    async def api_unit(request: Request) -> Response:
        try:
            point, unit, dataset, limit = unit_args(request)
            point = backend.model.resolve(point)
        except ClocheError as exc:
            return _error(exc)
        key = ("unit", backend.name, dataset, point, unit.key, limit)
        job = request.query_params.get("job") or ""
        return StreamingResponse(_stream(backend, key, job, lambda cancel, progress:
                                         unit_view.unit_page(
                                             backend.model, point, unit, dataset, limit=limit,
                                             cancel=cancel, progress=progress)),
                                 media_type="application/x-ndjson",
                                 headers={"cache-control": "no-store"})

    async def api_unit_export(request: Request) -> Response:
        """The unit page as one self-contained HTML file (from the cache when seen)."""
        try:
            point, unit, dataset, limit = unit_args(request)
            point = backend.model.resolve(point)
            key = ("unit", backend.name, dataset, point, unit.key, limit)
            data = await anyio.to_thread.run_sync(lambda: backend.compute(
                key, lambda model: unit_view.unit_page(model, point, unit, dataset,
                                                       limit=limit)))
        except ClocheError as exc:
            return _error(exc)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{point}-{unit.key}")[:120] + ".html"
        return HTMLResponse(unit_page_html(data), headers={
            "cache-control": "no-store", "content-disposition": f'attachment; filename="{name}"'})

    async def api_unit_tokens(request: Request) -> Response:
        try:
            point = request.query_params.get("point") or ""
            unit = parse_unit(request.query_params.get("unit"),
                              request.query_params.get("direction"))
            text = request.query_params.get("text") or ""
        except ClocheError as exc:
            return _error(exc)
        return await blocking(lambda: backend.compute(
            ("unit_tokens", point, unit.key, text), unit_view.token_activations, point, unit,
            text))

    async def api_text(request: Request) -> Response:
        text = request.query_params.get("text") or ""
        return await blocking(lambda: backend.compute(("text", text), text_view.text_page,
                                                      text))

    async def api_intervene(request: Request) -> Response:
        try:
            q = request.query_params
            direction = parse_unit(None, q["direction"]).direction if q.get("direction") \
                else None
            edit = intervene_view.Edit(
                point=q.get("point") or "", op=q.get("op") or "zero",
                factor=_float(request, "factor", 0.0), unit=_optional_int(request, "unit"),
                head=_optional_int(request, "head"), direction=direction)
            text = q.get("text") or ""
            new = _int(request, "max_new_tokens", 20, low=1, high=intervene_view.MAX_NEW_TOKENS)
        except ClocheError as exc:
            return _error(exc)
        return await blocking(lambda: backend.compute(("intervene", text, edit, new),
                                                      intervene_view.intervene_page, text,
                                                      edit, max_new_tokens=new))

    async def api_contexts(request: Request) -> Response:
        return await blocking(lambda: backend.compute(None, contexts_view.contexts_page))

    async def api_context_slice(request: Request) -> Response:
        q = request.query_params
        return await blocking(lambda: backend.compute(
            None, contexts_view.slice_page, q.get("name") or "", q.get("key") or "",
            q.get("index") or ""))

    async def api_context_clear(request: Request) -> Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(UsageError("the body must be JSON: {\"name\": ...}"))
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _error(UsageError("name the save context to clear"))
        return await blocking(lambda: backend.compute(None, contexts_view.clear_context, name))

    def head_args(request: Request) -> tuple[int, int]:
        return (_int(request, "layer", low=0, high=int(backend.model.n_layers) - 1),
                _int(request, "head", low=0, high=int(backend.model.n_heads) - 1))

    async def api_head_pattern(request: Request) -> Response:
        try:
            layer, head = head_args(request)
        except ClocheError as exc:
            return _error(exc)
        text = request.query_params.get("text") or ""
        return await blocking(lambda: backend.compute(("head_pattern", layer, head, text),
                                                      head_view.head_pattern, layer, head, text))

    async def api_head_circuits(request: Request) -> Response:
        try:
            layer, head = head_args(request)
        except ClocheError as exc:
            return _error(exc)
        return await blocking(lambda: backend.compute(("head_circuits", layer, head),
                                                      head_view.head_circuits, layer, head))

    async def api_head_ablation(request: Request) -> Response:
        try:
            layer, head = head_args(request)
            dataset = request.query_params.get("dataset") or backend.dataset
            limit = _int(request, "limit", backend.limit, low=1)
        except ClocheError as exc:
            return _error(exc)
        key = ("head_ablation", backend.name, layer, head, dataset, limit)
        job = request.query_params.get("job") or ""
        return StreamingResponse(_stream(backend, key, job, lambda cancel, progress:
                                         head_view.head_ablation(
                                             backend.model, layer, head, dataset, limit,
                                             progress=_passes(progress, 2), cancel=cancel)),
                                 media_type="application/x-ndjson",
                                 headers={"cache-control": "no-store"})

    def graph_data(request: Request) -> Any:
        """The pruned graph of the query's prompt (the full one computed once, cached)."""
        q = request.query_params
        prompt, target = q.get("prompt") or "", q.get("target") or None
        keep, edge_keep = _float(request, "keep", 0.8), _float(request, "edge_keep", 0.98)
        max_nodes = _int(request, "max_nodes", 200, high=100_000)
        dictionaries = tuple(sorted(backend.model.dictionaries()))
        full = backend.compute(("graph", dictionaries, prompt, target, max_nodes),
                               graph_view.full_graph, prompt, target, max_nodes)
        return backend.compute(("graph_pruned", dictionaries, prompt, target, max_nodes, keep,
                                edge_keep), lambda _model: graph_view.graph_page(
                                    full, keep, edge_keep))

    async def api_graph(request: Request) -> Response:
        return await blocking(lambda: graph_data(request))

    async def api_graph_json(request: Request) -> Response:
        """The pruned graph as a JSON file (``AttributionGraph.from_json`` reads it)."""
        try:
            data = await anyio.to_thread.run_sync(lambda: graph_data(request))
        except ClocheError as exc:
            return _error(exc)
        return Response(json.dumps(data["graph"]), media_type="application/json", headers={
            "cache-control": "no-store",
            "content-disposition": 'attachment; filename="attribution-graph.json"'})

    async def api_cancel(request: Request) -> Response:
        return _json({"cancelled": backend.cancel_job(request.path_params["job"])})

    routes = [Route("/", root), *(Route(f"/{name}", page) for name in PAGES),
              Route("/api/model", api_model), Route("/api/unit", api_unit),
              Route("/api/unit/tokens", api_unit_tokens),
              Route("/api/unit/export", api_unit_export), Route("/api/text", api_text),
              Route("/api/intervene", api_intervene), Route("/api/contexts", api_contexts),
              Route("/api/contexts/slice", api_context_slice),
              Route("/api/contexts/clear", api_context_clear, methods=["POST"]),
              Route("/api/head/pattern", api_head_pattern),
              Route("/api/head/circuits", api_head_circuits),
              Route("/api/head/ablation", api_head_ablation),
              Route("/api/graph", api_graph), Route("/api/graph/json", api_graph_json),
              Route("/api/jobs/{job}/cancel", api_cancel, methods=["POST"]),
              Mount("/static", StaticFiles(directory=str(STATIC)), name="static")]
    return Guard(Starlette(routes=routes), token, host)


async def _stream(backend: Backend, key: Any, job: str,
                  work: Callable[[Any, Callable[[dict[str, Any]], None]], Any]
                  ) -> AsyncIterator[bytes]:
    """JSON lines: ``{"type": "progress", ...}`` while ``work`` runs in a thread, then
    ``{"type": "result", "data": ...}`` or ``{"type": "error", ...}``; cached results at once."""
    hit, value = backend.cached(key)
    if hit:
        yield _line({"type": "result", "data": value, "cached": True})
        return
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    cancel = backend.start_job(job) if job else None
    if cancel is None:
        import threading

        cancel = threading.Event()

    def progress(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(events.put_nowait, {"type": "progress", **event})

    def run() -> Any:
        return backend.compute(key, lambda _model: work(cancel, progress))

    task = asyncio.ensure_future(anyio.to_thread.run_sync(run))
    task.add_done_callback(_retrieve)  # a cancelled page's failure is expected, not logged
    try:
        yield _line({"type": "progress", "stage": "starting", "fraction": 0.0})
        while not task.done():
            getter = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if getter in done:
                yield _line(getter.result())
            else:
                getter.cancel()
        try:
            yield _line({"type": "result", "data": task.result(), "cached": False})
        except Cancelled as exc:
            yield _line({"type": "cancelled", "error": str(exc)})
        except ClocheError as exc:
            yield _line({"type": "error", "error": str(exc), "kind": type(exc).__name__})
    finally:
        cancel.set()  # a closed connection stops the computation (no-op once it is done)
        if job:
            backend.end_job(job)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _line(value: Any) -> bytes:
    return (json.dumps(_clean(value)) + "\n").encode()
