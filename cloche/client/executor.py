"""The remote executor: a model served by ``cloche serve``, reached over one connection.

``cloche.connect(...)`` returns a :class:`cloche.Model` over a :class:`RemoteExecutor`, so the
same notebook code runs against ``cloche.load(...)`` and a server. Each request record is sent
as it is (probe and shipped functions inside it travel with cloudpickle and run on the server);
the reply is the same output a local executor returns. The tokenizer and config are rebuilt in
this process from the server's files, so text is tokenized here and only ids travel.

Remote-only: ``session`` (reconnect to it later), ``resumed``, ``address``, ``reconnect()``.
Ctrl-C while waiting cancels the request on the server and keeps the connection usable.
"""

from __future__ import annotations

import os
import pathlib
import ssl
import tempfile
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

from cloche import errors
from cloche.api import requests as rq
from cloche.api.executor import CancelEvent, EventSink, Executor
from cloche.api.futures import RequestFuture, wait
from cloche.api.model import Model
from cloche.client.connection import ClientConnection
from cloche.model.info import ModelInfo
from cloche.wire.transport import client_ssl_context

__all__ = ["RemoteExecutor", "connect", "parse_address"]

T = TypeVar("T")
_UNSET: Any = object()
# Loading a tokenizer or config imports transformers, whose lazy module fails when several
# threads import it at once: one loader at a time in this process.
_LOADING = threading.Lock()


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
    address: str | tuple[str, int] | None = None,
    *,
    token: str | None = None,
    session: str | None = None,
    tls: bool | str | os.PathLike[str] | ssl.SSLContext | None = None,
    timeout: float = 30.0,
    reconnect_timeout: float = 60.0,
    shared_memory: bool | None = None,
) -> Model:
    """Connect to ``cloche serve`` at ``address`` and authenticate with ``token``.

    Left out, ``address`` is ``$CLOCHE_ADDRESS`` and ``token`` is ``$CLOCHE_TOKEN`` (what
    ``cloche serve`` reads too), so a notebook need not carry the secret.

    ``session``: resume an earlier session (its save contexts) by id; ``SessionLost`` if the
    server no longer has it. ``tls``: ``True`` verifies the server against the system CAs, a
    path trusts that certificate/CA file. When the connection drops (a network blip, a server
    restarted with ``--state-dir``), the next request reconnects to the same session, retrying
    for up to ``reconnect_timeout`` seconds.

    ``shared_memory``: when the server runs on this machine as the same user, large results
    arrive through shared memory instead of the socket (negotiated at connect; anything else
    stays on TCP). Left out, it is on unless ``$CLOCHE_SHARED_MEMORY`` is ``0``.
    """
    if address is None:
        address = os.environ.get("CLOCHE_ADDRESS", "").strip()
        if not address:
            raise errors.UsageError("connect needs the server's address: pass it (host:port) or"
                                    " set $CLOCHE_ADDRESS")
    if token is None:
        token = os.environ.get("CLOCHE_TOKEN", "").strip()
        if not token:
            raise errors.UsageError("connect needs the server's token (printed by `cloche"
                                    " serve`): pass token=... or set $CLOCHE_TOKEN")
    if shared_memory is None:
        shared_memory = os.environ.get("CLOCHE_SHARED_MEMORY", "1").strip().lower() not in (
            "0", "false", "no", "off")
    return Model(RemoteExecutor(address, token=token, session=session, tls=tls,
                                timeout=timeout, reconnect_timeout=reconnect_timeout,
                                shared_memory=shared_memory))


class RemoteExecutor:
    """Executes request records on a server; one connection, reopened to the same session."""

    def __init__(self, address: str | tuple[str, int], *, token: str, session: str | None = None,
                 tls: Any = None, timeout: float = 30.0, reconnect_timeout: float = 60.0,
                 shared_memory: bool = True) -> None:
        if not isinstance(token, str) or not token:
            raise errors.UsageError("connect needs the server's token (printed by `cloche serve`)")
        self._host, self._port = parse_address(address)
        self._token = token
        self._ssl = client_ssl_context(os.fspath(tls) if isinstance(tls, os.PathLike) else tls)
        self._timeout = timeout
        self._reconnect_timeout = reconnect_timeout
        self._shared_memory = shared_memory
        self._lock = threading.Lock()
        self._conn = self._open(session)
        self._info: ModelInfo | None = None
        self._config: Any = None
        self._tokenizer: Any = _UNSET

    # ----------------------------------------------------------------- connection
    def _open(self, session: str | None) -> ClientConnection:
        conn = ClientConnection(self._host, self._port, token=self._token, session=session,
                                ssl_context=self._ssl, timeout=self._timeout,
                                shared_memory=self._shared_memory)
        if session is not None and not conn.resumed:  # never continue in an empty session
            conn.close()
            raise errors.SessionLost(
                f"the server at {self.address} no longer has session {session[:8]}… (it"
                " restarted without --state-dir, or the session expired): its save contexts"
                " are gone; cloche.connect(...) without session= starts a new session")
        return conn

    def _reopen(self, session: str) -> ClientConnection:
        """Reconnect to ``session`` after the connection dropped, retrying while the server is
        away (restarting, say) for up to ``reconnect_timeout`` seconds."""
        deadline = time.monotonic() + self._reconnect_timeout
        delay = 0.1
        while True:
            try:
                return self._open(session)
            except (errors.AuthError, errors.SessionLost):
                raise
            except errors.ConnectionError as exc:
                if time.monotonic() + delay > deadline:
                    raise errors.ConnectionError(
                        f"lost the connection to {self.address} and could not reconnect within"
                        f" {self._reconnect_timeout:g} s: {exc.message}") from exc
                time.sleep(delay)  # back off while the server is away
                delay = min(delay * 2, 2.0)

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    @property
    def session(self) -> str:
        """The session id: ``connect(..., session=...)`` gets its save contexts back."""
        return self._conn.session

    @property
    def resumed(self) -> bool:
        """Whether this connection resumed an existing session."""
        return self._conn.resumed

    def reconnect(self) -> None:
        """Open a fresh connection to the same session (in-flight requests fail)."""
        with self._lock:
            old = self._conn
            old.close()
            self._conn = self._reopen(old.session)

    def _connection(self) -> ClientConnection:
        with self._lock:
            if self._conn.closed:
                self._conn = self._reopen(self._conn.session)
            return self._conn

    def close(self) -> None:
        self._conn.close()

    # ----------------------------------------------------------------- the seam
    def submit(self, request: rq.Request[T], *, on_event: EventSink | None = None
               ) -> RequestFuture[T]:
        conn = self._connection()
        try:
            return conn.submit(request, on_event=on_event)
        except errors.ConnectionError:
            # The connection died before the request left: a dead connection's requests are
            # cancelled by the server, so sending it again on a fresh one is safe.
            with self._lock:
                if self._conn is conn:
                    conn.close()
            return self._connection().submit(request, on_event=on_event)

    def execute(self, request: rq.Request[T], *, cancel: CancelEvent | None = None,
                on_event: EventSink | None = None) -> T:
        return wait(self.submit(request, on_event=on_event), cancel)

    # ----------------------------------------------------------------- description
    def describe(self) -> ModelInfo:
        if self._info is None:
            self._info = self.execute(rq.Describe())
        return self._info

    @property
    def config(self) -> Any:
        """The model's Hugging Face config, rebuilt locally from the server's."""
        with _LOADING:
            return self._load_config()

    def _load_config(self) -> Any:
        if self._config is None:
            from transformers import AutoConfig

            values = dict(self.execute(rq.Config()))
            model_type = values.pop("model_type", None)
            self._config = AutoConfig.for_model(model_type, **values) if model_type else values
        return self._config

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, loaded locally from the server's files (None if it has none).

        Loaded once, by one thread at a time (see ``_LOADING``).
        """
        with _LOADING:
            return self._load_tokenizer()

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is _UNSET:
            files = self.execute(rq.TokenizerFiles())
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

    def __repr__(self) -> str:
        return f"RemoteExecutor({self.address}, session {self.session[:8]})"


if TYPE_CHECKING:  # mypy: this class is an Executor
    def _is_executor(executor: RemoteExecutor) -> Executor:
        return executor
