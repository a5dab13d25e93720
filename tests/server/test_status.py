"""``model.server_status()`` and ``cloche status``: what the server is doing, as a session may
see it — the running request, the queue (other principals' requests counted, not named),
sessions, connections, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import cloche
import pytest
from cloche.server.principals import Principal

from tests.conftest_server import REPO
from tests.server.helpers import InProcessServer

HOLD = threading.Event()
ALICE = Principal("alice", "alice-token-0123456789")
BOB = Principal("bob", "bob-token-0123456789abc")


def held(model):
    return HOLD.wait(120)


@pytest.fixture(scope="module")
def team(server_model_dir):
    with InProcessServer(cloche.load(server_model_dir), token=None,
                         principals=(ALICE, BOB)) as server:
        yield server


def test_status_names_your_requests_and_counts_the_others(team):
    HOLD.clear()
    with cloche.connect(team.address, token=ALICE.token) as alice, \
            cloche.connect(team.address, token=BOB.token) as bob:
        started = threading.Event()
        busy = bob.submit("call", held, on_event=lambda e: e.get("type") == "started"
                          and started.set())
        assert started.wait(60)
        queued = threading.Event()
        waiting = alice.submit("run", "def f():",
                               on_event=lambda e: e.get("type") == "queued" and queued.set())
        assert queued.wait(60)
        status = alice.server_status()
        HOLD.set()
        busy.result(timeout=60)
        waiting.result(timeout=60)
    assert status["principal"] == "alice" and status["model"] == alice.name
    assert status["running"]["request"] is None and not status["running"]["yours"]  # bob's
    assert status["running"]["seconds"] >= 0
    assert status["queue"] == [{"request": "Run", "yours": True, "session": alice.session[:8],
                                "position": 1, "ahead": 1}]
    assert status["sessions"] >= 2 and status["your_sessions"] >= 1
    assert status["connections"] >= 2 and status["memory"]["peak_rss_bytes"] > 0


def test_a_local_model_has_no_server_status():
    with pytest.raises(cloche.UsageError, match="needs a server"):
        cloche.load().server_status()


def test_cloche_status_prints_it(served):
    env = dict(os.environ, CLOCHE_TOKEN=served.token, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "cloche", "status", served.address], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "running: nothing" in done.stdout and "queue: 0 waiting" in done.stdout
    assert "you are owner" in done.stdout
