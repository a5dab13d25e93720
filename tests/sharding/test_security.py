"""The control plane between ranks: nothing executable without the group's key, nothing stuck.

An attacker who reaches the control store (a ``torch.distributed.TCPStore``) can write any key.
Before, workers unpickled whatever appeared under their command keys, so one write ran code in
a worker. Now the store listens only on the address the ranks were given, the group works
under a prefix derived from its key, and every pickled payload is sealed with that key.
"""

from __future__ import annotations

import datetime
import pickle

import cloche
import pytest
import torch
import torch.distributed as tdist
from cloche.sharding.launch import start_local
from cloche.sharding.sealing import open_sealed, seal, store_prefix

from tests.sharding.conftest import TIMEOUT_S, ids_batch


class _Marker:
    """Unpickling this writes a file: proof that a stranger's bytes ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _listening_addresses(port: int) -> set[str]:
    """The local addresses a TCP socket listens on at ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


@pytest.fixture(scope="module")
def group(tiny4_dir):
    model = start_local(tiny4_dir("gpt2"), 2, timeout_s=TIMEOUT_S, threads=1)
    try:
        yield model
    finally:
        model.close()


def test_the_store_listens_only_on_loopback(group):
    port = group.executor._rank.layout.config.master_port
    # 127.0.0.1 in /proc's little-endian hex; never 00000000 (every interface)
    assert _listening_addresses(port) == {"0100007F"}


def test_a_strangers_pickle_in_the_store_never_runs(group, tmp_path):
    layout = group.executor._rank.layout
    host, port = layout.config.master_addr, layout.config.master_port
    stranger = tdist.TCPStore(host, port, None, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=10))
    marker = tmp_path / "ran"
    bomb = pickle.dumps(_Marker(str(marker)))
    seq = group.executor._seq + 1
    # where the old code looked, and even under the group's secret prefix (as if it leaked)
    for name in (f"cloche/cmd/{seq}", f"cloche/{store_prefix(layout.key)}/cmd/{seq}",
                 f"cloche/{store_prefix(layout.key)}/light/1/1"):
        stranger.set(name, bomb)
    want = cloche.load(group.executor._local.path).run(ids_batch(seed=4)).logits
    got = group.run(ids_batch(seed=4)).logits  # the real command with this number
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert group.save_context("default").keys() == []  # a light read on rank 1
    assert not marker.exists()


def test_seals_bind_the_key_the_name_and_the_bytes():
    key = b"k" * 32
    sealed = seal(key, "cmd/3", b"payload")
    assert open_sealed(key, "cmd/3", sealed) == b"payload"
    for wrong_key, name, data in [(b"x" * 32, "cmd/3", sealed), (key, "cmd/4", sealed),
                                  (key, "cmd/3", sealed[:-1] + b"X"), (key, "cmd/3", b"short")]:
        with pytest.raises(cloche.errors.ProtocolError, match="not sealed"):
            open_sealed(wrong_key, name, data)


def _keep_unpicklable_state(ctx, x):
    ctx.state["fn"] = lambda: None  # cannot travel back to rank 0


def test_one_value_that_cannot_travel_is_a_clear_error_and_reads_go_on(group):
    """Before: reading it killed rank 1's read thread and every later read hung for everyone."""
    last = f"layers.{group.n_layers - 1}.mlp.post"
    group.run(ids_batch(), probes={last: _keep_unpicklable_state}, save="bad")
    assert group.owner_of(last) == 1
    with pytest.raises(cloche.UsageError, match="cannot be sent to rank 0") as info:
        group.save_context("bad").state  # noqa: B018 - the read is the test
    assert info.value.rank == 1
    # every kind of read touching rank 1 still answers
    assert group.save_context("bad").keys() == []
    assert "bad" in group.save_contexts()
    assert group.param(f"layers.{group.n_layers - 1}.mlp.W_in").shape[0] == group.d_model
    group.save_context("bad").clear()
    assert "bad" not in group.save_contexts()


def test_a_group_needs_a_key(tiny4_dir):
    from cloche.sharding.layout import DistConfig

    with pytest.raises(cloche.UsageError, match="control key"):
        DistConfig(model_dir=str(tiny4_dir("gpt2")), rank=0, world_size=2)
