"""The fair queue on its own: weighted round-robin across principals, round-robin across
their sessions, FIFO within one, and positions that match the order jobs are taken."""

from __future__ import annotations

import threading

from cloche.server.fairqueue import FairQueue
from hypothesis import given
from hypothesis import strategies as st


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


def test_a_principal_with_many_sessions_gets_its_share_not_more():
    q: FairQueue[str] = FairQueue()
    for session in ("a1", "a2", "a3"):  # alice opened three sessions, each with two jobs
        for i in range(2):
            q.put(session, f"{session}-{i}", group="alice")
    q.put("b1", "b1-0", group="bob")
    q.put("b1", "b1-1", group="bob")
    taken = [q.get(0) for _ in range(8)]
    assert taken == ["a1-0", "b1-0", "a2-0", "b1-1", "a3-0", "a1-1", "a2-1", "a3-1"]


def test_a_weighted_principal_gets_that_many_turns_in_a_row():
    q: FairQueue[str] = FairQueue()
    for i in range(4):
        q.put("a", f"a{i}", group="alice", weight=2)
        q.put("b", f"b{i}", group="bob")
    assert [item for item, _ in q.positions()] == ["a0", "a1", "b0", "a2", "a3", "b1", "b2", "b3"]
    assert [q.get(0) for _ in range(8)] == ["a0", "a1", "b0", "a2", "a3", "b1", "b2", "b3"]


operations = st.lists(st.one_of(
    st.tuples(st.just("put"), st.sampled_from("abcd"), st.integers(1, 3)),
    st.tuples(st.just("get")),
    st.tuples(st.just("remove"), st.sampled_from("abcd"), st.integers(0, 30)),
), max_size=60)


@given(operations)
def test_positions_are_the_order_of_get(ops):
    q: FairQueue[int] = FairQueue()
    for number, op in enumerate(ops):
        if op[0] == "put":
            _, lane, weight = op
            q.put(lane, number, group="x" if lane in "ab" else "y", weight=weight)
        elif op[0] == "get":
            q.get(0)
        else:
            q.remove(op[1], op[2])
    promised = [item for item, _ in q.positions()]
    assert len(q) == len(promised)
    assert [q.get(0) for _ in promised] == promised
    assert q.get(0) is None
