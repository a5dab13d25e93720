"""Fixtures for the web UI tests: the default model here, on a server, on a sharded server,
each with one UI app; and one headless Chromium (Debian's, driven by Playwright).

A machine without Chromium skips the browser tests with the reason; under CI (``CI=true``) a
missing browser fails them instead, so CI cannot pass without running them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import secrets
import shutil

import cloche
import pytest
from cloche.default_model import weights_dir
from cloche.ui import start_ui

from tests.conftest_server import ServerProcess
from tests.needs import missing

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
ARTIFACTS = pathlib.Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
LIMIT = 24  # dataset examples a unit page reads in the tests (the CLI's default is 512)


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CLOCHE_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


_LOCAL: dict[str, cloche.Model] = {}


@pytest.fixture(scope="session")
def local_default() -> cloche.Model:
    """The shipped default model in this process (shared; its scratch contexts are cleared)."""
    if "model" not in _LOCAL:
        _LOCAL["model"] = cloche.load()
    return _LOCAL["model"]


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        missing("no Chromium here (apt-get install chromium); the browser tests need it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Backend:
    """One UI app over one kind of model; ``close()`` stops both."""

    def __init__(self, kind: str, model: cloche.Model, server: ServerProcess | None) -> None:
        self.kind, self.model, self.server = kind, model, server
        self.web = start_ui(model, limit=LIMIT)

    def close(self) -> None:
        self.web.stop()
        if self.server is not None:
            self.model.close()
            self.server.stop()


@contextlib.contextmanager
def logged_in_page(browser, backend: Backend, *, width: int = 1300, downloads: bool = False):
    """A browser page that opened the UI's launch URL (which sets the cookie); on leaving, no
    script error may have happened on it."""
    context = browser.new_context(viewport={"width": width, "height": 900},
                                  accept_downloads=downloads)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.goto(backend.web.url())
    yield p
    context.close()
    assert errors == []


def start_backend(kind: str, local: cloche.Model, tmp: pathlib.Path) -> Backend:
    if kind == "local":
        return Backend(kind, local, None)
    token = secrets.token_urlsafe(16)
    extra = ("--world-size", "2") if kind == "sharded" else ()
    server = ServerProcess(weights_dir(), token, *extra, log_path=tmp / f"{kind}.log")
    atexit.register(server.stop)
    return Backend(kind, cloche.connect(server.address, token=token), server)
