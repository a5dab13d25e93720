"""Sessions: private namespaces that survive reconnects, shared contexts, idle expiry, and the
memory cap for saved data."""

from __future__ import annotations

import socket
import time

import cloche
import pytest
import torch
from cloche.client import connect
from cloche.server.sessions import Session, SessionRegistry

from tests.server.helpers import InProcessServer, wait_until


def keep(ctx, x):
    ctx.save("x", x[:, :2])


def test_reconnecting_with_the_session_id_gets_the_contexts_back(served):
    first = connect(served.address, token=served.token)
    first.run("def f():", probes={"embed": keep}, save="kept")
    saved = first.save_context("kept").fetch("x")
    session = first.session
    first.close()
    with connect(served.address, token=served.token, session=session) as again:
        assert again.executor.resumed and again.session == session
        assert "kept" in again.save_contexts()
        assert torch.equal(again.save_context("kept").fetch("x"), saved)
    with connect(served.address, token=served.token) as stranger:
        assert not stranger.executor.resumed and "kept" not in stranger.save_contexts()
        assert stranger.save_context("kept").keys() == []


def test_a_dropped_connection_reconnects_transparently_to_the_same_session(served):
    with connect(served.address, token=served.token) as model:
        model.run("x = 1", probes={"embed": keep}, save="survives")
        session = model.session
        model.executor._conn._framed.sock.shutdown(socket.SHUT_RDWR)  # the network drops under the client
        assert model.save_context("survives").num_runs == 1  # reconnected, same session
        assert model.session == session and model.executor.resumed
        model.executor.reconnect()
        assert model.save_context("survives").num_runs == 1


def test_an_unknown_session_id_is_a_clear_error_not_an_empty_session(served):
    with pytest.raises(cloche.SessionLost, match="no longer has session"):
        connect(served.address, token=served.token, session="f" * 32)


def test_shared_contexts_are_shared(served):
    with connect(served.address, token=served.token) as a, \
            connect(served.address, token=served.token) as b:
        a.save_context("shared/test-shared").clear()
        a.run("a", probes={"embed": keep}, save="shared/test-shared")
        b.run("b", probes={"embed": keep}, save="shared/test-shared")
        assert a.save_context("shared/test-shared").num_runs == 2
        assert "shared/test-shared" in b.save_contexts()
        a.save_context("shared/test-shared").clear()


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir, max_saved_bytes=256 * 1024)


def test_idle_sessions_expire_with_their_contexts(local_model):
    with InProcessServer(local_model, session_idle_expiry=0.3) as server:
        model = connect(server.address, token=server.token)
        model.run("def f():", probes={"embed": keep}, save="ephemeral")
        session = model.session
        assert any(n.startswith(f"p/owner/s/{session}/") for n in local_model.save_contexts())
        model.close()
        assert wait_until(lambda: not any(n.startswith(f"p/owner/s/{session}/")
                                          for n in local_model.save_contexts())), \
            "the idle session never expired"
        with pytest.raises(cloche.SessionLost):
            connect(server.address, token=server.token, session=session)


def test_memory_cap_gives_a_clear_error_and_rolls_back(local_model):
    with InProcessServer(local_model) as server, connect(server.address, token=server.token) as m:
        m.run("x", probes={"embed": lambda ctx, x: ctx.save("small", torch.zeros(100))},
              save="capped")
        with pytest.raises(cloche.ResourceLimit, match="limit of 262144 bytes"):
            m.run("x", probes={"embed": lambda ctx, x: ctx.save("big", torch.zeros(100_000))},
                  save="capped")
        handle = m.save_context("capped")
        assert handle.keys() == ["small"] and handle.num_runs == 1
        m.run("y", probes={"embed": lambda ctx, x: ctx.save("small", torch.zeros(100))},
              save="capped")
        assert handle.num_runs == 2
        handle.clear()


def test_session_namespacing_rules():
    session = Session("a" * 32, "alice")
    assert session.context_name(None, "default") == f"p/alice/s/{'a' * 32}/default"
    assert session.context_name("shared/x", "default") == "p/alice/shared/x"
    names = [f"p/alice/s/{'a' * 32}/mine", f"p/alice/s/{'b' * 32}/theirs", "p/alice/shared/x",
             "p/bob/shared/y", f"p/bob/s/{'a' * 32}/forged", "shared/z", "__shapes__"]
    assert session.visible(names) == ["mine", "shared/x"]
    with pytest.raises(cloche.UsageError):
        session.context_name("shared/", "default")


def test_registry_expires_only_idle_sessions():
    registry = SessionRegistry(idle_expiry=10)
    busy, _ = registry.open(None)
    idle, _ = registry.open(None)
    registry.release(idle)
    dropped = []
    assert registry.expire(dropped.append, now=time.monotonic() + 5) == []
    assert registry.expire(dropped.append, now=time.monotonic() + 11) == [idle.id]
    assert dropped == [idle] and len(registry) == 1
    assert registry.open(busy.id) == (busy, True)
