"""The state directory's journal: every commit is on disk before it is visible; a crash at any
moment leaves the last complete commit; what is read back equals what was committed."""

from __future__ import annotations

import json

import pytest
import torch
from cloche.errors import ResourceLimit
from cloche.probes import Covariance, Mean, TopK
from cloche.probes.actions import context_action
from cloche.probes.journal import COMPACT_EVERY, Journal
from cloche.probes.store import SaveStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def _commit(store: SaveStore, name: str, i: int, *, state: bool = True) -> None:
    txn = store.begin()
    writes = txn.writes(name)
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4) + i
    writes.save("x", x)
    writes.save(f"only-{i % 3}", x[:1])
    writes.reduce("mean", x[None], Mean(), example_ids=None, mask=None)
    writes.reduce("cov", x[None], Covariance(), example_ids=None, mask=None)
    writes.reduce("top", x[None], TopK(2), example_ids=torch.tensor([i]), mask=None)
    if state:
        writes.state["i"] = i
        writes.state["t"] = torch.tensor([float(i)])
    writes.runs += 1
    writes.examples += 3
    txn.commit()


def _same(a: SaveStore, b: SaveStore, name: str) -> None:
    ca, cb = a.find(name), b.find(name)
    assert ca is not None and cb is not None
    assert (ca.num_runs, ca.num_examples) == (cb.num_runs, cb.num_examples)
    assert sorted(ca.entries) == sorted(cb.entries)
    for key in ca.entries:
        assert len(ca.entries[key]) == len(cb.entries[key])
        for u, v in zip(ca.entries[key], cb.entries[key]):
            assert torch.equal(u, v)
    assert ca.state.keys() == cb.state.keys()
    assert ca.state["i"] == cb.state["i"] and torch.equal(ca.state["t"], cb.state["t"])
    for rname in ("mean", "cov", "top"):
        want, got = ca.reducers[rname].result(), cb.reducers[rname].result()
        for field in want:
            assert torch.equal(want[field], got[field]), (rname, field)


def test_commits_survive_a_restart(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    for i in range(5):
        _commit(store, "s/abc/acts", i)
    _same(store, SaveStore(journal=Journal(tmp_path)), "s/abc/acts")


def test_compaction_keeps_everything(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    for i in range(COMPACT_EVERY + 5):
        _commit(store, "ctx", i, state=i % 2 == 0)
    folder = next((tmp_path / "contexts").iterdir())
    assert len(list(folder.glob("*.safetensors"))) <= 6  # one base file and what followed
    _same(store, SaveStore(journal=Journal(tmp_path)), "ctx")


def test_an_interrupted_commit_leaves_the_last_complete_one(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    _commit(store, "ctx", 0)
    _commit(store, "ctx", 1)
    folder = next((tmp_path / "contexts").iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    # a crash after the file of commit 2 was written but before the manifest named it, and one
    # in the middle of writing a file (a temporary left behind)
    (folder / "00000099.safetensors").write_bytes(b"half a file")
    (folder / ".manifest.json.xyz.tmp").write_text("{")
    # and a context whose very first commit never completed
    (tmp_path / "contexts" / "never").mkdir()
    (tmp_path / "contexts" / "never" / "00000001.safetensors").write_bytes(b"\0")
    again = SaveStore(journal=Journal(tmp_path))
    assert again.names() == ["ctx"]
    assert again.find("ctx").num_runs == 2
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    assert sorted(p.name for p in folder.iterdir()) == sorted(["manifest.json",
                                                               *manifest["files"]])
    _same(store, again, "ctx")


def test_a_rolled_back_run_writes_nothing(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    txn = store.begin()
    txn.writes("ctx").save("x", torch.ones(3))
    txn.rollback()
    assert list((tmp_path / "contexts").iterdir()) == []


def test_clear_and_restore_reach_the_disk(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    _commit(store, "a", 0)
    _commit(store, "b", 1)
    context_action(store, "a", "persist", (str(tmp_path / "a.safetensors"),))
    context_action(store, "a", "clear")
    assert SaveStore(journal=Journal(tmp_path)).names() == ["b"]
    context_action(store, "c", "restore", (str(tmp_path / "a.safetensors"),))
    again = SaveStore(journal=Journal(tmp_path))
    assert again.names() == ["b", "c"]
    assert torch.equal(context_action(again, "c", "fetch", ("x", "stack", None)),
                       context_action(store, "c", "fetch", ("x", "stack", None)))


def test_a_failing_disk_fails_the_run_and_loses_nothing(tmp_path):
    store = SaveStore(journal=Journal(tmp_path))
    _commit(store, "ctx", 0)
    (tmp_path / "contexts" / "new").write_text("in the way")  # the folder cannot be made
    with pytest.raises(ResourceLimit, match="cannot write save context 'new'"):
        _commit(store, "new", 1)
    assert store.names() == ["ctx"] and store.find("ctx").num_runs == 1
    _commit(store, "ctx", 2)  # the store goes on
    assert SaveStore(journal=Journal(tmp_path)).find("ctx").num_runs == 2


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "s/x/c"]), st.booleans()), min_size=1,
                max_size=40))
def test_any_sequence_of_commits_and_clears_reads_back_the_same(tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("journal")
    store = SaveStore(journal=Journal(root))
    for i, (name, clear) in enumerate(steps):
        if clear:
            context_action(store, name, "clear")
        else:
            _commit(store, name, i)
    again = SaveStore(journal=Journal(root))
    assert again.names() == store.names()
    for name in store.names():
        _same(store, again, name)
