"""``cloche ui`` and ``cloche serve --ui`` as commands: exactly one URL line, which answers
200 with the Model page; the web server's own log stays off stdout."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading

import httpx
import pytest

from tests.conftest_server import REPO

pytestmark = pytest.mark.slow

URL = re.compile(r"^http://127\.0\.0\.1:\d+/model\?token=[A-Za-z0-9_\-]+$")


class Command:
    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        environ = dict(os.environ, **(env or {}), PYTHONUNBUFFERED="1")
        environ["PYTHONPATH"] = str(REPO) + os.pathsep + environ.get("PYTHONPATH", "")
        self.proc = subprocess.Popen([sys.executable, "-m", "cloche", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=environ, cwd=str(REPO), text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout: float = 180.0) -> str | None:
        return self.lines.get(timeout=timeout)

    def stop(self) -> list[str]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        rest = []
        while (line := self.lines.get(timeout=30)) is not None:
            rest.append(line)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return rest


def test_cloche_ui_prints_one_url_that_answers_the_model_page():
    command = Command("ui", "--limit", "8")
    try:
        url = command.line()
        assert url is not None and URL.match(url), url
        response = httpx.get(url, timeout=120)
        assert response.status_code == 200
        assert "cloche-default" in response.text
        model = httpx.get(url.replace("/model?", "/api/model?"), timeout=300).json()
        assert model["model"] == "cloche-default" and len(model["head_scores"]) == 3
    finally:
        rest = command.stop()
    assert rest == []  # nothing else on stdout: no access log, no banner
    assert command.proc.returncode == 0


def test_cloche_ui_connects_to_a_server(served):
    command = Command("ui", "--connect", served.address, env={"CLOCHE_TOKEN": served.token})
    try:
        url = command.line()
        assert url is not None and URL.match(url), url
        response = httpx.get(url, timeout=120)
        assert response.status_code == 200
        info = httpx.get(url.replace("/model?", "/api/model?"), timeout=300).json()["info"]
        assert info["n_layers"] == 2 and info["d_model"] == 32  # the served tiny GPT-2
    finally:
        command.stop()


@pytest.mark.parametrize("world_size", [1, 2])
def test_cloche_serve_ui_prints_the_ui_url(server_model_dir, world_size):
    command = Command("serve", "--model", str(server_model_dir), "--port", "0", "--ui",
                      "--world-size", str(world_size), "--log-level", "WARNING",
                      env={"CLOCHE_TOKEN": "x" * 24})
    try:
        lines = []
        while not any(line.startswith("cloche: web UI at ") for line in lines):
            line = command.line()
            assert line is not None, lines
            lines.append(line)
        url = lines[-1].removeprefix("cloche: web UI at ")
        assert URL.match(url), url
        assert httpx.get(url, timeout=120).status_code == 200
        assert sum(1 for line in lines if "http://" in line) == 1
        with httpx.Client(timeout=300) as client:
            client.get(url)
            info = client.get(url.split("/model?")[0] + "/api/model").json()["info"]
        assert info["world_size"] == world_size
    finally:
        command.stop()


def test_cloche_demo_ui_ends_with_links_to_the_neuron_and_the_head(tmp_path):
    command = Command("demo", "--no-plots", "--limit", "8", "--ui", "--out", str(tmp_path))
    try:
        lines: list[str] = []
        while not (lines and lines[-1].startswith("  head:")):
            line = command.line(timeout=600)
            assert line is not None, lines
            lines.append(line)
        neuron = lines[-2].removeprefix("  neuron: ")
        head = lines[-1].removeprefix("  head:   ")
        assert re.match(r"^http://127\.0\.0\.1:\d+/unit\?point=layers\.1\.mlp\.post&unit=\d+"
                        r"&token=", neuron), neuron
        assert re.match(r"^http://127\.0\.0\.1:\d+/head\?layer=1&head=\d&token=", head), head
        assert httpx.get(head, timeout=120).status_code == 200
    finally:
        command.stop()
