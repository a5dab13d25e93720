"""``cloche.connect``: a model on a server, with the local Model API.

The same notebook code runs against ``cloche.load(...)`` and ``cloche.connect(...)``: every
method below mirrors :class:`cloche.Model` and returns the same types (tensors arrive as
tensors, results as the same dataclasses). Probe functions and ``call`` functions are shipped
with cloudpickle and run on the server. Extras that only make sense remotely: ``submit`` (a
future whose ``cancel()`` stops the work on the server), ``session`` (reconnect to it later),
``reconnect`` and ``close``.

Ctrl-C while waiting cancels the request on the server and keeps the connection usable.
"""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import ssl
import tempfile
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

from cloche import errors
from cloche.client.connection import ClientConnection, RemoteFuture
from cloche.client.handles import RemoteSaveContext
from cloche.client.progress import ProgressReporter
from cloche.wire.transport import client_ssl_context

__all__ = ["RemoteModel", "connect", "parse_address"]

_UNSET = object()
_SUBMITTABLE = {
    "run", "generate", "run_dataset", "call", "probe_points", "resolve", "param", "param_names",
    "tokenize", "decode", "to_str_tokens", "save_contexts", "ping",
}


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """``"host:port"``, ``"[::1]:port"`` or ``(host, port)``."""
    if isinstance(address, tuple) and len(address) == 2:
        return str(address[0]), int(address[1])
    if not isinstance(address, str):
        raise errors.UsageError(f"an address is 'host:port' or (host, port), not {address!r}")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise errors.UsageError(f"an address is 'host:port', not {address!r}")
    return host.strip("[]"), int(port)


def connect(
    address: str | tuple[str, int],
    *,
    token: str,
    session: str | None = None,
    tls: bool | str | os.PathLike[str] | ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> RemoteModel:
    """Connect to ``cloche serve`` at ``address`` and authenticate with ``token``.

    ``session``: resume an earlier session (its save contexts) by id. ``tls``: ``True`` verifies
    the server against the system CAs, a path trusts that certificate/CA file.
    """
    return RemoteModel(address, token=token, session=session, tls=tls, timeout=timeout)


class RemoteModel:
    """A model served by ``cloche serve``; the same API as :class:`cloche.Model`."""

    def __init__(self, address: str | tuple[str, int], *, token: str, session: str | None = None,
                 tls: Any = None, timeout: float = 30.0) -> None:
        if not isinstance(token, str) or not token:
            raise errors.UsageError("connect needs the server's token (printed by `cloche serve`)")
        self._host, self._port = parse_address(address)
        self._token = token
        self._ssl = client_ssl_context(os.fspath(tls) if isinstance(tls, os.PathLike) else tls)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn = self._open(session)
        self._config: Any = None
        self._tokenizer: Any = _UNSET

    # ----------------------------------------------------------------- connection
    def _open(self, session: str | None) -> ClientConnection:
        return ClientConnection(self._host, self._port, token=self._token, session=session,
                                ssl_context=self._ssl, timeout=self._timeout)

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def session(self) -> str:
        """The session id: ``connect(..., session=model.session)`` gets its contexts back."""
        return self._conn.session

    @property
    def resumed(self) -> bool:
        """Whether this connection resumed an existing session."""
        return self._conn.resumed

    def reconnect(self) -> RemoteModel:
        """Open a fresh connection to the same session (in-flight requests fail)."""
        with self._lock:
            old = self._conn
            old.close()
            self._conn = self._open(old.session)
        return self

    def _connection(self) -> ClientConnection:
        with self._lock:
            if self._conn.closed:
                self._conn = self._open(self._conn.session)
            return self._conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- requests
    def _submit(self, method: str, *args: Any, _on_event: Any = None, **kwargs: Any) -> RemoteFuture:
        conn = self._connection()
        try:
            return conn.submit(method, args, kwargs, on_event=_on_event)
        except errors.ConnectionError:
            # The connection died before the request left: a dead connection's requests are
            # cancelled by the server, so sending it again on a fresh one is safe.
            with self._lock:
                if self._conn is conn:
                    conn.close()
            return self._connection().submit(method, args, kwargs, on_event=_on_event)

    def _call(self, method: str, *args: Any, _on_event: Any = None, _cancel: Any = None,
              **kwargs: Any) -> Any:
        return self._wait(self._submit(method, *args, _on_event=_on_event, **kwargs), _cancel)

    @staticmethod
    def _wait(future: RemoteFuture, cancel: Any = None) -> Any:
        try:
            if cancel is None:
                return future.result()
            while True:
                try:
                    return future.result(timeout=0.05)
                except concurrent.futures.TimeoutError:
                    if cancel.is_set():
                        future.cancel()
                        raise errors.Cancelled("the request was cancelled",
                                               request_id=future.request_id) from None
        except KeyboardInterrupt:
            future.cancel()
            raise
        except concurrent.futures.CancelledError:
            raise errors.Cancelled("the request was cancelled",
                                   request_id=future.request_id) from None

    def submit(self, method: str, *args: Any,
               on_event: Callable[[dict[str, Any]], None] | None = None,
               **kwargs: Any) -> RemoteFuture:
        """Start ``method(*args, **kwargs)`` on the server; returns a future at once.

        ``future.cancel()`` stops the work on the server at its next layer boundary.
        ``on_event`` receives the request's events as they arrive (on the client's reader
        thread): ``{"type": "queued", "position": n}`` (1 = next), ``{"type": "started"}`` and,
        for ``run_dataset``, ``{"type": "progress", "done", "total", "tokens", "eta", ...}``.
        For ``run_dataset``, a callable ``progress=`` receives the progress dicts.
        """
        if method not in _SUBMITTABLE:
            raise errors.UsageError(f"submit takes one of {sorted(_SUBMITTABLE)}, not {method!r}")
        if method == "run_dataset":
            progress = kwargs.pop("progress", None)
            kwargs["progress"] = callable(progress) or on_event is not None
            reporter = ProgressReporter(progress if callable(progress) else None, "")
            forward = on_event

            def both(event: dict[str, Any]) -> None:
                reporter(event)
                if forward is not None:
                    forward(event)

            on_event = both
        return self._submit(method, *args, _on_event=on_event, **kwargs)

    def ping(self, value: Any = None) -> Any:
        """Round trip to the server (echoes ``value``)."""
        return self._call("ping", value)

    # ----------------------------------------------------------------- description
    def info(self) -> dict[str, Any]:
        return self._call("info")

    def _info(self, key: str) -> Any:
        return self._conn.info.get(key)

    name = property(lambda self: self._info("name"))
    n_layers = property(lambda self: self._info("n_layers"))
    n_heads = property(lambda self: self._info("n_heads"))
    d_model = property(lambda self: self._info("d_model"))
    d_vocab = property(lambda self: self._info("d_vocab"))
    d_mlp = property(lambda self: self._info("d_mlp"))
    d_head = property(lambda self: self._info("d_head"))
    causal = property(lambda self: self._info("causal"))
    device = property(lambda self: self._info("device"))

    @property
    def config(self) -> Any:
        """The model's Hugging Face config, rebuilt locally from the server's."""
        if self._config is None:
            from transformers import AutoConfig

            values = dict(self._call("config"))
            model_type = values.pop("model_type", None)
            self._config = (
                AutoConfig.for_model(model_type, **values) if model_type else values
            )
        return self._config

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded locally from the server's files (None if it has none)."""
        if self._tokenizer is _UNSET:
            files = self._call("tokenizer_files")
            if files is None:
                self._tokenizer = None
            else:
                from transformers import AutoTokenizer

                with tempfile.TemporaryDirectory() as directory:
                    for name, data in files.items():
                        if "/" in name or "\\" in name or name.startswith("."):
                            raise errors.ProtocolError(f"bad tokenizer file name {name!r}")
                        (pathlib.Path(directory) / name).write_bytes(data)
                    self._tokenizer = AutoTokenizer.from_pretrained(directory,
                                                                    local_files_only=True)
        return self._tokenizer

    def probe_points(self) -> list[Any]:
        return self._call("probe_points")

    def resolve(self, name: str) -> str:
        return self._call("resolve", name)

    # ----------------------------------------------------------------- running
    def run(self, inputs: Any, *, probes: Mapping[str, Any] | None = None,
            grad_probes: Mapping[str, Any] | None = None, save: str | None = None,
            backward: Any = None, return_logits: bool = True, cancel: Any = None) -> Any:
        return self._call("run", inputs, probes=probes, grad_probes=grad_probes, save=save,
                          backward=backward, return_logits=return_logits, _cancel=cancel)

    def generate(self, prompt: Any, max_new_tokens: int = 20, *,
                 probes: Mapping[str, Any] | None = None, save: str | None = None,
                 temperature: float = 0.0, seed: int | None = None, cancel: Any = None) -> Any:
        return self._call("generate", prompt, max_new_tokens, probes=probes, save=save,
                          temperature=temperature, seed=seed, _cancel=cancel)

    def run_dataset(self, dataset: Any, *, probes: Mapping[str, Any] | None = None,
                    save: str | None = None, batch_size: int = 8, limit: int | None = None,
                    progress: bool | Callable[[dict[str, Any]], None] | None = True,
                    cancel: Any = None) -> dict[str, Any]:
        """Like the local one; ``progress=True`` (the default here) shows a tqdm bar fed by the
        server's progress events (queue position while waiting, examples/tokens while running)."""
        reporter = ProgressReporter(progress, "run_dataset")
        try:
            return self._call("run_dataset", dataset, probes=probes, save=save,
                              batch_size=batch_size, limit=limit, progress=bool(progress),
                              _on_event=reporter, _cancel=cancel)
        finally:
            reporter.close()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` on the server, next to the model and its data."""
        if not callable(fn):
            raise errors.UsageError(f"call needs a callable, not {fn!r}")
        return self._call("call", fn, *args, **kwargs)

    # ----------------------------------------------------------------- save contexts
    def save_context(self, name: str = "default") -> RemoteSaveContext:
        if not isinstance(name, str) or not name:
            raise errors.UsageError(f"save context names are non-empty strings, not {name!r}")
        return RemoteSaveContext(self, name)

    def save_contexts(self) -> list[str]:
        return self._call("save_contexts")

    # ----------------------------------------------------------------- weights & tokens
    def param_names(self, canonical: bool = True) -> list[str]:
        return self._call("param_names", canonical)

    def param(self, name: str, *, grad: bool = False) -> Any:
        return self._call("param", name, grad=grad)

    def tokenize(self, text: str | list[str]) -> Any:
        return self._call("tokenize", text)

    def decode(self, ids: Any) -> str:
        return self._call("decode", ids)

    def to_str_tokens(self, ids: Any) -> list[str]:
        return self._call("to_str_tokens", ids)

    def __repr__(self) -> str:
        return f"RemoteModel({self.name!r} at {self.address}, session {self.session[:8]})"
