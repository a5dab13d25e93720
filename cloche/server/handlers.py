"""What a server can be asked to do: the method table.

Each method is *light* (answered at once on the connection's thread: listings, fetching saved
data, weights, tokenization — never stuck behind a long run) or *heavy* (model work: queued
fairly and executed one at a time by the worker thread, with the request's cancellation event).
Methods reach the model only through the Model API, via the session's :class:`SessionModelView`.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloche.server.view import SessionModelView

__all__ = ["METHODS", "CallContext", "Method"]


@dataclass
class CallContext:
    """What a handler gets besides its arguments."""

    view: SessionModelView
    cancel: threading.Event
    emit: Callable[[dict[str, Any]], None]
    progress_interval: float = 0.05


@dataclass(frozen=True)
class Method:
    heavy: bool
    fn: Callable[..., Any]


def _model_method(name: str) -> Callable[..., Any]:
    def call(c: CallContext, *args: Any, **kwargs: Any) -> Any:
        return getattr(c.view, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _info(c: CallContext) -> dict[str, Any]:
    info = dict(c.view.info())
    info.update(name=c.view.name, device=str(c.view.device), session=c.view.session_id)
    return info


def _config(c: CallContext) -> dict[str, Any]:
    return c.view.config.to_dict()


def _tokenizer_files(c: CallContext) -> dict[str, bytes] | None:
    """The tokenizer as the files ``save_pretrained`` writes, for the client to load locally."""
    tokenizer = c.view.tokenizer
    if tokenizer is None:
        return None
    with tempfile.TemporaryDirectory() as directory:
        tokenizer.save_pretrained(directory)
        return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}


def _ping(c: CallContext, value: Any = None) -> Any:
    return value


def _run_dataset(c: CallContext, dataset: Any, *, progress: Any = True, **kwargs: Any) -> Any:
    last = [0.0]

    def report(update: dict[str, Any]) -> None:
        now = time.monotonic()
        if now - last[0] >= c.progress_interval or update.get("done") == update.get("total"):
            last[0] = now
            c.emit({"type": "progress", **update})

    return c.view.run_dataset(dataset, progress=report if progress else None, **kwargs)


def _ctx_method(name: str) -> Callable[..., Any]:
    def call(c: CallContext, context: str, *args: Any, **kwargs: Any) -> Any:
        handle = c.view.save_context(context)
        attr = getattr(handle, name)
        return attr(*args, **kwargs) if callable(attr) else attr

    call.__name__ = f"ctx.{name}"
    return call


METHODS: dict[str, Method] = {
    # light: answered immediately, never queued
    "ping": Method(False, _ping),
    "info": Method(False, _info),
    "config": Method(False, _config),
    "tokenizer_files": Method(False, _tokenizer_files),
    **{
        name: Method(False, _model_method(name))
        for name in (
            "probe_points", "resolve", "param", "param_names", "tokenize", "decode",
            "to_str_tokens", "save_contexts",
        )
    },
    **{
        f"ctx.{name}": Method(False, _ctx_method(name))
        for name in ("keys", "fetch", "state", "num_runs", "reducers", "result", "nbytes")
    },
    # heavy: model work, queued fairly, cancellable
    "run": Method(True, _model_method("run")),
    "generate": Method(True, _model_method("generate")),
    "call": Method(True, _model_method("call")),
    "run_dataset": Method(True, _run_dataset),
    **{f"ctx.{name}": Method(True, _ctx_method(name)) for name in ("clear", "persist", "restore")},
}
