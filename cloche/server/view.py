"""A session's view of the model: the Model API with save-context names in its namespace.

Handlers — and user functions shipped with ``call`` — see this object instead of the model, so
``m.run(..., save="acts")`` or ``m.save_context("acts")`` inside a shipped function touches the
session's own ``acts``, and long calls inherit the request's cancellation event. Everything
else (probe points, params, tokenizer, config...) is the model's own, through the Model API.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any

from cloche.errors import UsageError
from cloche.server.sessions import Session

__all__ = ["DEFAULT_CONTEXT", "SessionModelView"]

DEFAULT_CONTEXT = "default"


class SessionModelView:
    def __init__(self, model: Any, session: Session, cancel: threading.Event | None = None) -> None:
        self._model = model
        self._session = session
        self._cancel = cancel

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._model, name)

    def __repr__(self) -> str:
        return f"{self._model!r} (session {self._session.id[:8]})"

    @property
    def session_id(self) -> str:
        return self._session.id

    def _ctx(self, name: str | None) -> str:
        return self._session.context_name(name, DEFAULT_CONTEXT)

    def _cancel_for(self, cancel: Any) -> Any:
        return cancel if cancel is not None else self._cancel

    def run(self, inputs: Any, *, save: str | None = None, cancel: Any = None, **kwargs: Any) -> Any:
        return self._model.run(inputs, save=self._ctx(save), cancel=self._cancel_for(cancel),
                               **kwargs)

    def generate(self, prompt: Any, *args: Any, save: str | None = None, cancel: Any = None,
                 **kwargs: Any) -> Any:
        return self._model.generate(prompt, *args, save=self._ctx(save),
                                    cancel=self._cancel_for(cancel), **kwargs)

    def run_dataset(self, dataset: Any, *, save: str | None = None, cancel: Any = None,
                    **kwargs: Any) -> Any:
        return self._model.run_dataset(dataset, save=self._ctx(save),
                                       cancel=self._cancel_for(cancel), **kwargs)

    def save_context(self, name: str = DEFAULT_CONTEXT) -> Any:
        handle = self._model.save_context(self._ctx(name))
        handle.name = name  # what the user called it, not the namespaced name
        return handle

    def save_contexts(self) -> list[str]:
        return self._session.visible(self._model.save_contexts())

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(view, *args, **kwargs)`` with the model's error reporting for shipped code."""
        if not callable(fn):
            raise UsageError(f"call needs a callable, not {fn!r}")

        @functools.wraps(fn)
        def in_view(_model: Any, *a: Any, **k: Any) -> Any:
            return fn(self, *a, **k)

        return self._model.call(in_view, *args, **kwargs)

    def drop_all(self) -> None:
        """Clear every context of the session (it expired)."""
        for name in self._model.save_contexts():
            if name.startswith(self._session.prefix):
                self._model.save_context(name).clear()
