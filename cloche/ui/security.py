"""Who may talk to the UI: the launch secret, the Host header and the Origin.

The UI runs code on the machine that holds the model, so every request must prove it comes from
the person who launched it (as Jupyter does):

- a per-launch secret, in the printed URL's ``token=`` the first time, then in a cookie that is
  ``HttpOnly`` and ``SameSite=Strict`` and named after the port (browsers share cookies between
  ports of one host);
- a ``Host`` header naming this very address (127.0.0.1, localhost or [::1] with our port):
  anything else is a DNS-rebinding page that resolved its own name to 127.0.0.1;
- no cross-origin requests: an ``Origin`` other than ours, or ``Sec-Fetch-Site`` saying
  cross-site or same-site (another port of localhost), is refused; requests that change state
  (anything but GET/HEAD) must also carry the ``X-Cloche-UI`` header, which a cross-origin page
  cannot send without a CORS preflight that we never grant.

This is plain ASGI middleware, so it wraps the whole app (static files included).
"""

from __future__ import annotations

import hmac
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qs

__all__ = ["Guard", "cookie_name"]

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STATE_HEADER = b"x-cloche-ui"


def cookie_name(port: int) -> str:
    return f"cloche_ui_{port}"


class Guard:
    """ASGI middleware: refuse what does not carry the secret or comes from another origin.

    ``port`` is set once the listening socket is bound (before the first request).
    """

    def __init__(self, app: Any, token: str, host: str = "127.0.0.1") -> None:
        self.app = app
        self.token = token
        self.host = host
        self.port = 0

    @property
    def allowed_hosts(self) -> set[str]:
        names = set(LOOPBACK_NAMES) | {self.host}
        return {f"{name}:{self.port}" for name in names}

    def _valid(self, candidate: str | None) -> bool:
        return bool(candidate) and hmac.compare_digest(str(candidate).encode(),
                                                       self.token.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                await self.app(scope, receive, send)
            return  # websockets are not used: nothing else is served
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = headers.get("host", "")
        if host not in self.allowed_hosts:
            await _refuse(send, 403, f"unknown Host header {host!r}: open the URL cloche ui"
                                     " printed")
            return
        origin = headers.get("origin")
        if origin is not None and origin not in {f"http://{h}" for h in self.allowed_hosts}:
            await _refuse(send, 403, "cross-origin requests are refused")
            return
        if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            await _refuse(send, 403, "cross-site requests are refused")
            return
        if scope["method"] not in ("GET", "HEAD") and STATE_HEADER.decode() not in headers:
            await _refuse(send, 403, "requests that change state need the X-Cloche-UI header")
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        from_query = self._valid((query.get("token") or [None])[0])
        cookies = SimpleCookie()
        try:
            cookies.load(headers.get("cookie", ""))
        except Exception:  # noqa: BLE001 - a malformed cookie header is simply no cookie
            cookies = SimpleCookie()
        morsel = cookies.get(cookie_name(self.port))
        if not from_query and not self._valid(morsel.value if morsel else None):
            await _refuse(send, 401, "this UI needs its launch token: open the URL that"
                                     " cloche ui printed (it ends in ?token=...)")
            return
        if not from_query:
            await self.app(scope, receive, send)
            return
        cookie = (f"{cookie_name(self.port)}={self.token}; Path=/; HttpOnly;"
                  " SameSite=Strict").encode("latin-1")

        async def send_with_cookie(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie)]
            await send(message)

        await self.app(scope, receive, send_with_cookie)


async def _refuse(send: Any, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
