"""The ranks' direct connections (``sharding.links``) and the channel over them.

Two ranks' links are set up in this process (one thread each) through a real TCPStore on
127.0.0.1; the whole stack over them is covered by the other tests in this folder, which run
CPU groups and so go through these connections.
"""

from __future__ import annotations

import datetime
import socket
import threading
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as tdist
from cloche.errors import Aborted, WorkerLost
from cloche.sharding.control import Control
from cloche.sharding.direct import DirectChannel
from cloche.sharding.links import _HELLO, _MAGIC, Links

KEY = b"k" * 32


def _store() -> tdist.TCPStore:
    return tdist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=20))


def _client(master: tdist.TCPStore) -> tdist.TCPStore:
    return tdist.TCPStore("127.0.0.1", master.port, None, is_master=False,
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=20))


def _open_pair(store: tdist.TCPStore, keys: tuple[bytes, bytes] = (KEY, KEY),
               before_connect: threading.Event | None = None) -> tuple[Links, Links]:
    """Rank 0 and rank 1's links (rank 0 accepts, rank 1 connects)."""
    out: dict[int, Links | BaseException] = {}

    def open_rank(rank: int, store: tdist.Store) -> None:
        try:
            if rank == 1 and before_connect is not None:
                before_connect.wait(20)
            out[rank] = Links.open(store, rank, 2, keys[rank], "127.0.0.1", timeout_s=20)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out[rank] = exc

    threads = [threading.Thread(target=open_rank, args=(r, _client(store))) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for value in out.values():
        if isinstance(value, BaseException):
            raise value
    return out[0], out[1]  # type: ignore[return-value]


@pytest.fixture
def pair() -> Iterator[tuple[Links, Links]]:
    links = _open_pair(_store())
    yield links
    for link in links:
        link.close()


def _never(slow: bool) -> None:
    return None


def test_tensors_of_every_size_and_dtype_arrive_whole(pair):
    a, b = pair
    sent = {
        "big": torch.randn(5_000_000),  # 20 MB
        "bf16": torch.randn(3, 7).to(torch.bfloat16),
        "bool": torch.rand(4, 4) > 0.5,
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.empty(0, 3),
        "ints": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "strided": torch.randn(6, 4).t(),  # sent contiguous
    }
    for key, tensor in sent.items():
        a.send(1, key, tensor.contiguous(), command=7)
    for key in reversed(list(sent)):  # taken in any order: the key finds the message
        command, got, wants_ack = b.take(0, key, checkpoint=_never)
        assert command == 7 and not wants_ack
        assert got is not None and got.dtype == sent[key].dtype
        assert torch.equal(got, sent[key])
    b.send(0, "back", torch.ones(2), command=None)  # both directions on one connection
    assert torch.equal(a.take(1, "back", checkpoint=_never)[1], torch.ones(2))


def test_messages_of_a_drained_command_never_reach_a_later_receive(pair):
    a, b = pair
    a.send(1, "3/0/act/0>1", torch.ones(1), command=3)
    a.send(1, "light", torch.ones(1), command=None)
    a.send(1, "probe", torch.ones(1), command=4)
    b.take(0, "probe", checkpoint=_never)  # everything sent before it has arrived
    assert b.drop_through(3) == 1
    a.send(1, "3/1/act/0>1", torch.ones(1), command=3)  # a late message of command 3
    a.send(1, "4/0/act/0>1", torch.full((1,), 4.0), command=4)
    assert b.take(0, "4/0/act/0>1", checkpoint=_never)[1].item() == 4.0
    assert b.take(0, "light", checkpoint=_never)[0] == -1  # not a command's: kept

    def give_up(slow: bool) -> None:
        raise Aborted("nothing came")
    for stale in ("3/0/act/0>1", "3/1/act/0>1"):
        with pytest.raises(Aborted):
            b.take(0, stale, checkpoint=give_up)


def test_a_closed_peer_ends_a_wait_with_worker_lost(pair):
    a, b = pair
    waited: list[BaseException] = []

    def wait() -> None:
        try:
            b.take(0, "never sent", checkpoint=_never)
        except BaseException as exc:  # noqa: BLE001 - checked below
            waited.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    a.close()
    waiter.join(10)
    assert not waiter.is_alive()
    assert isinstance(waited[0], WorkerLost) and waited[0].rank == 0


def test_a_connection_without_the_key_is_refused_and_setup_goes_on():
    store = _store()
    go = threading.Event()
    strangers: list[bytes] = []

    def stranger() -> None:  # connects to rank 0 first, with the right magic, without the key
        address = bytes(_client(store).get("links/0")).decode()
        host, _, port = address.rpartition("|")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(_HELLO.pack(_MAGIC, 1, b"n" * 32))
            strangers.append(sock.recv(64))  # rank 0's challenge and proof
            sock.sendall(b"x" * 32)  # a wrong answer
            sock.settimeout(10)
            strangers.append(sock.recv(1))  # closed: b""
        go.set()

    t = threading.Thread(target=stranger)
    t.start()
    a, b = _open_pair(store, before_connect=go)
    t.join(10)
    try:
        assert len(strangers[0]) == 64 and strangers[1] == b""
        a.send(1, "hello", torch.ones(3), command=None)  # the real rank 1 got the connection
        assert torch.equal(b.take(0, "hello", checkpoint=_never)[1], torch.ones(3))
    finally:
        a.close()
        b.close()


def test_a_rank_with_another_key_cannot_join():
    store = _store()
    out: list[BaseException] = []

    def rank0() -> None:
        try:
            Links.open(_client(store), 0, 2, KEY, "127.0.0.1", timeout_s=3)
        except WorkerLost as exc:
            out.append(exc)

    t = threading.Thread(target=rank0)
    t.start()
    try:
        with pytest.raises(WorkerLost, match="does not hold this group's key"):
            Links.open(_client(store), 1, 2, b"o" * 32, "127.0.0.1", timeout_s=3)
    finally:
        t.join(10)
    assert out and "did not connect" in str(out[0])  # rank 0 refused it too


def _control(store: tdist.TCPStore, rank: int) -> Control:
    client = _client(store)
    client.set(f"hb/{1 - rank}", "1")
    return Control(client, None, rank, 2, timeout_s=30, heartbeat_s=1)


def test_a_stream_keeps_at_most_window_messages_unacknowledged_and_abort_ends_the_wait(pair):
    store = _store()
    a, b = pair
    sender = DirectChannel(_control(store, 0), a, 0, torch.device("cpu"), key=KEY, window=2)
    receiver = DirectChannel(_control(store, 1), b, 1, torch.device("cpu"), key=KEY)
    sender.command = receiver.command = 1
    sender.control.begin(1)
    for n in range(2):
        sender.send(1, f"1/{n}/act/0>1", torch.full((2,), float(n)), stream="act")
    # the third waits for the first's acknowledgement: given once it is received
    receiver_done = threading.Thread(target=lambda: receiver.recv(0, "1/0/act/0>1"))
    receiver_done.start()
    sender.send(1, "1/2/act/0>1", torch.full((2,), 2.0), stream="act")
    receiver_done.join(10)
    # nothing takes the second: the fourth's wait for an acknowledgement ends with the abort
    sender.control.abort_event.set()
    sender.control.abort_origin = 1
    with pytest.raises(Aborted):
        sender.send(1, "1/3/act/0>1", torch.full((2,), 3.0), stream="act")
    assert torch.equal(receiver.recv(0, "1/2/act/0>1"), torch.full((2,), 2.0))  # in order
    assert receiver.drain(1) == 1  # the second, never received
    sender.flush(aborted=True)


def test_objects_travel_sealed_and_control_messages_arrive(pair):
    store = _store()
    a, b = pair
    sender = DirectChannel(_control(store, 0), a, 0, torch.device("cpu"), key=KEY)
    receiver = DirectChannel(_control(store, 1), b, 1, torch.device("cpu"), key=KEY)
    value = {"t": torch.arange(6.0).reshape(2, 3), "s": "text", "n": [1, 2]}
    sender.send_object(1, "1/res/0", value)
    got = receiver.recv_object(0, "1/res/0")
    assert got["s"] == "text" and got["n"] == [1, 2] and torch.equal(got["t"], value["t"])
    sender.post(1, "cmd/9", b"sealed bytes")
    sender.post(1, "empty", b"")
    assert receiver.take(0, "cmd/9") == b"sealed bytes"
    assert receiver.take(0, "empty") == b""


def _save_first(ctx, x):
    ctx.save("first", x[:, 0])


@pytest.mark.parametrize("direct", [True, False])
def test_a_cpu_group_on_either_path_matches_local(tiny4_dir, direct):
    """Direct connections (the default on CPU) and the store + gloo path that CUDA groups use
    (kept testable on CPU with ``direct_links=False``) give the local model's results."""
    import cloche
    from cloche.sharding.launch import start_local

    from tests.sharding.conftest import TIMEOUT_S, ids_batch
    from tests.threads import TORCH_THREADS

    path = tiny4_dir("gpt2")
    local = cloche.load(path)
    batch = ids_batch(seed=5)
    model = start_local(path, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS,
                        direct_links=direct)
    try:
        links = model.executor._rank.layout.links
        assert (links is not None) == direct
        assert isinstance(model.executor._rank.channel, DirectChannel) == direct
        got = model.run(batch, probes={"layers.3.resid_post": _save_first}, save="s")
        want = local.run(batch, probes={"layers.3.resid_post": _save_first}, save="s")
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.save_context("s").fetch("first", "list"),
                                   local.save_context("s").fetch("first", "list"))
        prompt = batch["input_ids"][1:, 3:]
        assert torch.equal(model.generate(prompt, 4).tokens, local.generate(prompt, 4).tokens)
    finally:
        model.close()
