"""One client's view of the served model: an executor wrapped in the client's session.

Every request a client sends — and every request made by code it ships with ``call`` — goes
through a :class:`SessionExecutor`: save-context names are rewritten into the session's own
namespace (``acts`` is ``p/{principal}/s/{session id}/acts``; ``shared/...`` names are common
to the sessions of one principal), listings show only what the session may see, and requests
made by shipped code inherit the cancellation of the request that runs it. Error messages name
contexts as the user called them.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, TypeVar, cast

from cloche.api import requests as rq
from cloche.api.executor import CancelEvent, EventSink, Executor, submit_in_thread
from cloche.api.futures import RequestFuture
from cloche.api.model import DEFAULT_CONTEXT, Model
from cloche.errors import ClocheError, UsageError
from cloche.model.info import ModelInfo
from cloche.runtime.interrupt import interruptible
from cloche.runtime.usercode import run_user_function
from cloche.server.sessions import Session

__all__ = ["SessionExecutor"]

T = TypeVar("T")
R = TypeVar("R", bound=rq.Request[Any])


class SessionExecutor:
    """``inner`` as seen by ``session``; ``cancel`` is the running request's cancellation."""

    def __init__(self, inner: Executor, session: Session,
                 cancel: CancelEvent | None = None) -> None:
        self._inner = inner
        self._session = session
        self._cancel = cancel

    @property
    def session_id(self) -> str:
        return self._session.id

    def describe(self) -> ModelInfo:
        return self._inner.describe()

    @property
    def tokenizer(self) -> Any:
        return self._inner.tokenizer

    @property
    def config(self) -> Any:
        return self._inner.config

    @property
    def hf_model(self) -> Any:
        """The served transformers module, for shipped code (None when sharded)."""
        return getattr(self._inner, "hf_model", None)

    def _namespaced(self, request: R) -> R:
        name = self._session.context_name
        if isinstance(request, (rq.Run, rq.Generate, rq.RunDataset)):
            return dataclasses.replace(request, save=name(request.save, DEFAULT_CONTEXT))
        if isinstance(request, rq.Context):
            return dataclasses.replace(request, name=name(request.name, DEFAULT_CONTEXT))
        return request

    def execute(self, request: rq.Request[T], *, cancel: CancelEvent | None = None,
                on_event: EventSink | None = None) -> T:
        cancel = cancel if cancel is not None else self._cancel
        if isinstance(request, rq.Quota):
            raise UsageError("caps on saved data are the server operator's: set them per"
                             " principal in the token file (max-saved-bytes=SIZE) or for the"
                             " whole server with --max-saved-bytes")
        if isinstance(request, rq.Call) and request.rank is None:
            # shipped code gets the model through this session (and this request's cancel)
            here = Model(SessionExecutor(self._inner, self._session, cancel))
            with interruptible(cancel):  # a cancel also stops a function stuck in a loop
                return run_user_function(request.fn, here, request.args, request.kwargs)
        try:
            value = self._inner.execute(self._namespaced(request), cancel=cancel,
                                        on_event=on_event)
        except ClocheError as exc:
            exc.message = exc.message.replace(self._session.prefix, "").replace(
                self._session.root, "")
            raise
        if isinstance(request, rq.ListContexts):
            # T is list[str] here, which mypy cannot tie to the narrowed request
            return cast(T, self._session.visible(cast("list[str]", value)))
        return value

    def submit(self, request: rq.Request[T], *, on_event: EventSink | None = None
               ) -> RequestFuture[T]:
        return submit_in_thread(self, request, on_event)

    def close(self) -> None:
        """Nothing to release: the served executor outlives every session."""

    def drop_all(self) -> None:
        """Clear every context of the session (it expired)."""
        for name in self._inner.execute(rq.ListContexts()):
            if name.startswith(self._session.prefix):
                self._inner.execute(rq.Context(name=name, action="clear"))

    def __repr__(self) -> str:
        return f"SessionExecutor({self._inner!r}, session {self._session.id[:8]})"


if TYPE_CHECKING:  # mypy: this class is an Executor
    def _is_executor(executor: SessionExecutor) -> Executor:
        return executor
