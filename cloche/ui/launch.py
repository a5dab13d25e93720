"""Start the web UI on loopback for a model: uvicorn in a background thread.

:func:`start_ui` binds the socket itself (so the port is known, and the :class:`Guard` can
check ``Host`` headers against it, before the first request), makes a per-launch secret and
returns a :class:`UIServer` whose ``url`` carries it. uvicorn's access log is off: request
lines would otherwise land on stdout next to the one URL the command prints.
"""

from __future__ import annotations

import secrets
import socket
import threading
from typing import Any
from urllib.parse import urlencode

from cloche.errors import UsageError
from cloche.ui.app import build_app
from cloche.ui.backend import Backend

__all__ = ["UIServer", "start_ui"]


class UIServer:
    """A running UI: ``url(page, **query)`` gives links with the token; ``stop()`` ends it."""

    def __init__(self, backend: Backend, token: str, sock: socket.socket, host: str) -> None:
        import uvicorn

        self.backend = backend
        self.token = token
        self.host = host
        self.port = int(sock.getsockname()[1])
        app = build_app(backend, token, host)
        app.port = self.port
        self.app = app
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="cloche-ui", daemon=True)
        self._thread.start()
        while not self._server.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        if not self._server.started:
            raise UsageError("the web UI did not start (see the log above)")

    def _serve(self) -> None:
        self._server.run(sockets=[self._sock])

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, page: str = "model", *, token: bool = True, **query: Any) -> str:
        """A link to ``page`` with ``query`` (and the launch token unless ``token=False``)."""
        params = {k: v for k, v in query.items() if v is not None}
        if token:
            params["token"] = self.token
        suffix = f"?{urlencode(params)}" if params else ""
        return f"{self.base}/{page}{suffix}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> UIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_ui(model: Any, *, host: str = "127.0.0.1", port: int = 0,
             dataset: str = "default:heldout", limit: int = 512,
             token: str | None = None) -> UIServer:
    """Serve the web UI for ``model`` (any :class:`cloche.Model`) on ``host:port`` (0: a free
    port) in a background thread; the returned server's ``url()`` is the link to open."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"the web UI cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(128)
    backend = Backend(model, dataset=dataset, limit=limit)
    return UIServer(backend, token or secrets.token_urlsafe(24), sock, host)
