"""A restart loses nothing that was committed (with ``--state-dir``), and never silently: the same
client object reconnects by itself to its session, or is told its session is gone."""

from __future__ import annotations

import threading

import cloche
import pytest
import torch

from tests.conftest_server import ServerProcess

TOKEN = "restart-test-token-0123456789"


def keep(ctx, x):
    ctx.save("x", x[:, :2])
    ctx.reduce("mean", x, cloche.Mean())
    ctx.state["runs"] = ctx.state.get("runs", 0) + 1


def test_kill_9_loses_no_committed_context(server_model_dir, tmp_path):
    state = tmp_path / "state"
    first = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state))
    try:
        model = cloche.connect(first.address, token=TOKEN)
        session = model.session
        for text in ["def f(x):", "for i in range(3):", "import os", "x = [1, 2]"]:
            model.run(text, probes={"embed": keep}, save="kept")
        handle = model.save_context("kept")
        want = (handle.fetch("x", "list"), handle.result("mean"), handle.state, handle.num_runs)
        model.run("y = 2", probes={"embed": keep}, save="shared/common")
    finally:
        first.proc.kill()  # kill -9: no chance to write anything more
        first.stop()
    second = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state),
                           "--port", str(first.port))
    try:
        # the same client object, no reconnect call: it finds its session and contexts
        got = (handle.fetch("x", "list"), handle.result("mean"), handle.state, handle.num_runs)
        assert model.session == session and model.executor.resumed
        assert len(got[0]) == len(want[0]) == 4
        assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))
        assert all(torch.equal(got[1][k], want[1][k]) for k in want[1])
        assert got[2] == want[2] == {"runs": 4}
        assert got[3] == want[3] == 4
        assert model.save_contexts() == ["kept", "shared/common"]
        model.run("z = 3", probes={"embed": keep}, save="kept")  # and it goes on from there
        assert handle.num_runs == 5
        model.close()
    finally:
        second.stop()


def test_without_a_state_dir_a_restart_is_a_clear_session_lost(server_model_dir, tmp_path):
    first = ServerProcess(server_model_dir, TOKEN)
    try:
        model = cloche.connect(first.address, token=TOKEN)
        model.run("def f(x):", probes={"embed": keep}, save="kept")
    finally:
        first.proc.kill()
        first.stop()
    second = ServerProcess(server_model_dir, TOKEN, "--port", str(first.port))
    try:
        with pytest.raises(cloche.SessionLost, match="without --state-dir"):
            model.save_context("kept").keys()
        with cloche.connect(second.address, token=TOKEN) as fresh:  # a new session works
            assert fresh.save_contexts() == []
        with pytest.raises(cloche.SessionLost):
            cloche.connect(second.address, token=TOKEN, session=model.session)
    finally:
        second.stop()


def test_the_client_waits_for_a_restarting_server(server_model_dir, tmp_path):
    """The next request after the server went away retries until it is back (up to 60 s)."""
    state = tmp_path / "state"
    first = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state))
    model = cloche.connect(first.address, token=TOKEN)
    model.run("def f(x):", probes={"embed": keep}, save="kept")
    first.proc.kill()
    first.stop()
    answered: list[int] = []
    waiting = threading.Thread(target=lambda: answered.append(
        model.save_context("kept").num_runs))
    waiting.start()  # asks while no server is there
    second = ServerProcess(server_model_dir, TOKEN, "--state-dir", str(state),
                           "--port", str(first.port))
    try:
        waiting.join(timeout=120)
        assert answered == [1]
        model.close()
    finally:
        second.stop()
