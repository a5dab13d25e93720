"""The fair queue on its own: round-robin across sessions, FIFO within one, positions."""

from __future__ import annotations

import threading

from cloche.server.fairqueue import FairQueue


def test_round_robin_across_sessions_fifo_within():
    q: FairQueue[str] = FairQueue()
    for item in ["a1", "a2", "a3"]:
        q.put("a", item)
    q.put("b", "b1")
    q.put("c", "c1")
    q.put("b", "b2")
    assert [p for _, p in q.positions()] == [1, 2, 3, 4, 5, 6]
    assert [item for item, _ in q.positions()] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert [q.get(0) for _ in range(6)] == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert q.get(0) is None


def test_a_busy_session_cannot_starve_a_newcomer():
    q: FairQueue[str] = FairQueue()
    for i in range(100):
        q.put("busy", f"busy{i}")
    assert q.get(0) == "busy0"
    q.put("newcomer", "n1")
    assert q.get(0) == "busy1"
    assert q.get(0) == "n1"


def test_remove_and_close():
    q: FairQueue[str] = FairQueue()
    q.put("a", "x")
    q.put("a", "y")
    assert q.remove("a", "x") and not q.remove("a", "x") and not q.remove("zzz", "y")
    assert dict(q.positions()) == {"y": 1}
    waiter_result = []
    empty: FairQueue[str] = FairQueue()
    waiter = threading.Thread(target=lambda: waiter_result.append(empty.get()))
    waiter.start()
    assert empty.close() == []
    waiter.join(60)
    assert waiter_result == [None]
    assert q.close() == ["y"] and q.get(0) is None
