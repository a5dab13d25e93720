"""Two "machines" on this one: two network namespaces joined by a veth pair, one torchrun each.

Each namespace sees only its loopback and its end of the veth pair, so every byte between the
"nodes" (rendezvous, control store, gloo) crosses that pair. The job (``netns_job.serve``) runs
on rank 0 of the sharded model and its results must match world size 1; then both torchruns
must end with exit code 0 (a clean shutdown on every rank, so both agents pass their exit
barrier).
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloche
import pytest
import torch

from tests.needs import missing
from tests.sharding.conftest import ids_batch, save_tiny4
from tests.threads import TORCH_THREADS

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # what the torchrun script runs
DEADLINE_S = 240.0  # both torchruns, start to exit, on a busy 2-core machine
AFTER_FAILURE_S = 30.0  # once one node failed, how long the other may take to notice


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True)


def _unavailable(reason: str) -> None:
    """Skip where this machine cannot build test networks (root and iproute2 are needed); under
    CI, whose machine has both, fail (``tests.needs.missing``)."""
    missing(f"the multi-node tests cannot build network namespaces here: {reason}")


def _need_namespaces() -> None:
    if shutil.which("ip") is None:
        _unavailable("iproute2 (the ip command) is not installed")
    if os.geteuid() != 0:
        _unavailable("creating network namespaces needs root")


@pytest.fixture
def namespaces():
    """Two namespaces a/b with a veth pair 10.231.<n>.1 <-> .2; removed afterwards."""
    _need_namespaces()
    tag = secrets.token_hex(3)  # unique: a namespace left over by a killed run cannot collide
    a, b = f"cla{tag}", f"clb{tag}"
    subnet = f"10.231.{os.getpid() % 250}"  # each pair is isolated: runs may share a subnet
    made = []
    etc = Path("/etc/netns")
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                _unavailable(f"network namespaces are unavailable here: {r.stderr.strip()}")
            made.append(ns)
            # `ip netns exec` mounts these over /etc: names resolve locally, and lookups of the
            # peer's address fail at once instead of waiting on an unreachable DNS server
            (etc / ns).mkdir(parents=True, exist_ok=True)
            (etc / ns / "hosts").write_text(f"127.0.0.1 localhost\n{subnet}.1 node-a\n"
                                            f"{subnet}.2 node-b\n")
            (etc / ns / "resolv.conf").write_text("options timeout:1 attempts:1\n")
            r = _ip("netns", "exec", ns, "true")
            if r.returncode != 0:
                _unavailable(f"cannot run a process in a network namespace: {r.stderr.strip()}")
        steps = [
            ("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"),
            ("link", "set", f"va{tag}", "netns", a),
            ("link", "set", f"vb{tag}", "netns", b),
            ("-n", a, "addr", "add", f"{subnet}.1/24", "dev", f"va{tag}"),
            ("-n", b, "addr", "add", f"{subnet}.2/24", "dev", f"vb{tag}"),
            ("-n", a, "link", "set", f"va{tag}", "up"), ("-n", b, "link", "set", f"vb{tag}", "up"),
            ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up"),
        ]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                _unavailable(f"cannot build the veth pair ({' '.join(step)}): {r.stderr.strip()}")
        yield {"a": a, "b": b, "addr": f"{subnet}.1", "ifaces": (f"va{tag}", f"vb{tag}")}
    finally:
        for ns in made:
            _ip("netns", "del", ns)
            shutil.rmtree(etc / ns, ignore_errors=True)


def _run_nodes(cmds: list[list[str]], envs: list[dict[str, str]], logs: list[Path]
               ) -> list[int | None]:
    """Start one process per node; wait for all (bounded). Returns their exit codes.

    Output goes to files (a full pipe cannot stall a node). Once a node has failed, the others
    get AFTER_FAILURE_S to end (a torchrun agent whose workers succeeded waits for its peers at
    the exit barrier, for minutes); whatever still runs at the deadline is stopped, workers too,
    and reported as None.
    """
    procs: list[subprocess.Popen] = []
    ended: queue.Queue[subprocess.Popen] = queue.Queue()
    try:
        for cmd, env, log in zip(cmds, envs, logs):
            with log.open("w") as out:
                proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)
            threading.Thread(target=lambda p=proc: (p.wait(), ended.put(p)), daemon=True).start()
        deadline = time.monotonic() + DEADLINE_S
        for _ in procs:
            try:
                proc = ended.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if proc.returncode != 0:
                deadline = min(deadline, time.monotonic() + AFTER_FAILURE_S)
        return [p.poll() for p in procs]
    finally:
        for p in procs:
            _stop(p)


def _tree(pid: int) -> dict[int, bytes]:
    """``pid`` and its descendants, with their command lines (torchrun starts every worker in
    a session of its own, so a process-group kill would not reach it)."""
    found: dict[int, bytes] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            found[p] = Path(f"/proc/{p}/cmdline").read_bytes()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue  # gone meanwhile
    return found


def _stop(proc: subprocess.Popen) -> None:
    """End a node still running: SIGTERM (the agent stops its workers), then SIGKILL the rest."""
    if proc.poll() is not None:
        return
    tree = _tree(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    for pid, cmdline in tree.items():
        try:  # only the very processes seen above (a pid may have been reused since)
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    proc.wait()


def test_every_rank_exits_zero_after_rank_0_returns(tiny4_dir, tmp_path):
    """The torchrun entry point on this machine, no namespaces needed: rank 0 hosts the control
    store in its own process and exits when its serve function returns, so it must keep the
    store up until rank 1 has shut down, or rank 1 takes the end for a loss (exit code 3)."""
    directory = tiny4_dir("gpt2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmds, envs, logs = [], [], []
    for rank in range(2):
        envs.append(dict(os.environ, PYTHONPATH=str(ROOT), RANK=str(rank), WORLD_SIZE="2",
                         LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                         OMP_NUM_THREADS="1", CLOCHE_TOKEN="multinode-test-token"))
        cmds.append([sys.executable, "-m", "cloche.sharding.worker", "--model", str(directory),
                     "--store-port-offset", "0", "--timeout", "20", "--threads", "1",
                     "--serve", "tests.sharding.netns_job:ping"])
        logs.append(tmp_path / f"rank{rank}.log")
    codes = _run_nodes(cmds, envs, logs)
    text = "\n".join(f"--- rank {n} (exit code {c}) ---\n{log.read_text()[-4000:]}"
                     for n, (c, log) in enumerate(zip(codes, logs)))
    assert codes == [0, 0], text


def test_torchrun_across_two_namespaces(namespaces, tiny4_dir, tmp_path):
    directory = tiny4_dir("gpt2")
    out = tmp_path / "netns.pt"
    cmds, envs, logs = [], [], []
    for node, (ns, iface) in enumerate(zip((namespaces["a"], namespaces["b"]),
                                           namespaces["ifaces"])):
        envs.append(dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME=iface,
                         CLOCHE_NETNS_OUT=str(out), OMP_NUM_THREADS=str(TORCH_THREADS),
                         CLOCHE_TOKEN="multinode-test-token"))
        cmds.append(["ip", "netns", "exec", ns, *TORCHRUN, "--nnodes", "2",
                     "--nproc-per-node", "1", "--node-rank", str(node),
                     "--master-addr", namespaces["addr"], "--master-port", "29640",
                     "-m", "cloche.sharding.worker", "--model", str(directory),
                     "--timeout", "20", "--threads", str(TORCH_THREADS),
                     "--serve", "tests.sharding.netns_job:serve"])
        logs.append(tmp_path / f"node{node}.log")
    started = time.monotonic()
    codes = _run_nodes(cmds, envs, logs)
    text = "\n".join(f"--- node {n} (exit code {c}) ---\n{log.read_text()[-6000:]}"
                     for n, (c, log) in enumerate(zip(codes, logs)))
    assert codes == [0, 0], (f"after {time.monotonic() - started:.0f} s (None: still running"
                             f" at the deadline, killed):\n{text}")
    got = torch.load(out)
    assert got["world_size"] == 2
    assert got["owners"] == {"layers.3.mlp.post": 1, "layers.0.resid_post": 0}
    local = cloche.load(directory)
    from tests.sharding.netns_job import _saver

    result = local.run(ids_batch(seed=11),
                       probes={"layers.3.mlp.post": _saver, "layers.0.resid_post": _saver},
                       grad_probes={"layers.1.resid_pre": _saver}, backward=True, save="n")
    torch.testing.assert_close(got["logits"], result.logits, atol=1e-5, rtol=0)
    assert got["loss"] == pytest.approx(result.loss, abs=1e-5)
    handle = local.save_context("n")
    assert sorted(got["saved"]) == handle.keys()
    for key, value in got["saved"].items():
        torch.testing.assert_close(value, handle.fetch(key), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["grad_W_in"], local.param("layers.3.mlp.W_in", grad=True),
                               atol=1e-5, rtol=0)
    assert torch.equal(got["tokens"], local.generate(torch.tensor([5, 17, 42]), 5).tokens)


# ------------------------------------------------------------------ four nodes, eight ranks

NODES, PER_NODE = 4, 2
EIGHT_TIMEOUT_S = 20.0  # the fault bound (--timeout) of the eight ranks
EIGHT_DEADLINE_S = 480.0  # four torchruns, eight ranks on a busy 2-core machine, start to exit


@pytest.fixture
def star():
    """Four namespaces n0..n3, each joined by a veth pair to a bridge in a fifth (the switch):
    10.232.<k>.1..4. Every byte between nodes crosses two veth pairs and the bridge."""
    _need_namespaces()
    tag = secrets.token_hex(3)
    hub = f"clh{tag}"
    nodes = [f"cl{n}{tag}" for n in range(NODES)]
    subnet = f"10.232.{os.getpid() % 250}"
    addrs = [f"{subnet}.{n + 1}" for n in range(NODES)]
    made = []
    etc = Path("/etc/netns")
    hosts = "127.0.0.1 localhost\n" + "".join(f"{a} node-{n}\n" for n, a in enumerate(addrs))

    def must(*args: str) -> None:
        r = _ip(*args)
        if r.returncode != 0:
            _unavailable(f"cannot build the four-node network ({' '.join(args)}):"
                         f" {r.stderr.strip()}")

    try:
        for ns in (hub, *nodes):
            must("netns", "add", ns)
            made.append(ns)
            (etc / ns).mkdir(parents=True, exist_ok=True)
            (etc / ns / "hosts").write_text(hosts)
            (etc / ns / "resolv.conf").write_text("options timeout:1 attempts:1\n")
        must("-n", hub, "link", "add", f"br{tag}", "type", "bridge")
        must("-n", hub, "link", "set", f"br{tag}", "up")
        for n, (ns, addr) in enumerate(zip(nodes, addrs)):
            inner, outer = f"v{n}{tag}", f"s{n}{tag}"
            must("link", "add", inner, "type", "veth", "peer", "name", outer)
            must("link", "set", inner, "netns", ns)
            must("link", "set", outer, "netns", hub)
            must("-n", hub, "link", "set", outer, "master", f"br{tag}")
            must("-n", hub, "link", "set", outer, "up")
            must("-n", ns, "addr", "add", f"{addr}/24", "dev", inner)
            must("-n", ns, "link", "set", inner, "up")
            must("-n", ns, "link", "set", "lo", "up")
        r = _ip("netns", "exec", nodes[-1], "ping", "-c", "1", "-W", "5", addrs[0])
        if r.returncode != 0 and shutil.which("ping") is not None:
            _unavailable(f"the four-node network does not carry packets: {r.stdout}{r.stderr}")
        yield {"nodes": nodes, "addrs": addrs, "ifaces": [f"v{n}{tag}" for n in range(NODES)]}
    finally:
        for ns in made:
            _ip("netns", "del", ns)
            shutil.rmtree(etc / ns, ignore_errors=True)


@pytest.fixture(scope="module")
def tiny8_dir(tmp_path_factory):
    """A tiny Llama of 8 blocks (untied embeddings, rotary, grouped-query attention)."""
    return save_tiny4("llama", tmp_path_factory.mktemp("llama8"), n_layers=8)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a node: its torchrun agent and every worker under it, at once."""
    for pid, cmdline in _tree(proc.pid).items():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.mark.slow
def test_eight_ranks_on_four_namespaces_match_one_process_and_a_lost_node_is_named(
        star, tiny8_dir, tmp_path):
    out, ready = tmp_path / "eight.pt", tmp_path / "ready.fifo"
    os.mkfifo(ready)
    said: queue.Queue[str] = queue.Queue()

    def listen() -> None:
        with ready.open() as fifo:  # blocks until rank 0 opens it to write
            said.put(fifo.read())

    threading.Thread(target=listen, daemon=True).start()
    procs: list[subprocess.Popen] = []
    logs = [tmp_path / f"node{n}.log" for n in range(NODES)]
    ended: dict[int, float] = {}
    done: queue.Queue[int] = queue.Queue()
    try:
        for node, (ns, iface) in enumerate(zip(star["nodes"], star["ifaces"])):
            env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME=iface,
                       CLOCHE_NETNS_OUT=str(out), CLOCHE_NETNS_READY=str(ready),
                       OMP_NUM_THREADS=str(TORCH_THREADS), CLOCHE_TOKEN="multinode-test-token")
            cmd = ["ip", "netns", "exec", ns, *TORCHRUN, "--nnodes", str(NODES),
                   "--nproc-per-node", str(PER_NODE), "--node-rank", str(node),
                   "--master-addr", star["addrs"][0], "--master-port", "29650",
                   "-m", "cloche.sharding.worker", "--model", str(tiny8_dir),
                   "--timeout", str(EIGHT_TIMEOUT_S), "--threads", str(TORCH_THREADS),
                   "--serve", "tests.sharding.netns_job:serve_eight"]
            with logs[node].open("w") as log:
                proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            procs.append(proc)

            def watch(p: subprocess.Popen = proc, n: int = node) -> None:
                p.wait()
                ended[n] = time.monotonic()
                done.put(n)

            threading.Thread(target=watch, daemon=True).start()

        def text() -> str:
            return "\n".join(f"--- node {n} (exit code {p.poll()}) ---\n"
                             f"{logs[n].read_text()[-5000:]}" for n, p in enumerate(procs))

        started = time.monotonic()
        try:
            assert said.get(timeout=EIGHT_DEADLINE_S) == "saved\n"
        except queue.Empty:
            pytest.fail(f"rank 0 saved nothing within {EIGHT_DEADLINE_S:.0f} s:\n{text()}")
        assert all(p.poll() is None for p in procs), text()
        killed_at = time.monotonic()
        _kill_tree(procs[NODES - 1])  # node 3: ranks 6 and 7
        bound = EIGHT_TIMEOUT_S + AFTER_FAILURE_S  # detection, then torchrun's own exit
        for _ in range(NODES):  # every node ends (the others once rank 0 is gone), bounded
            try:
                done.get(timeout=max(0.0, killed_at + 2 * bound - time.monotonic()))
            except queue.Empty:
                break
        log0 = logs[0].read_text()
        assert all(p.poll() is not None for p in procs), (
            f"{time.monotonic() - killed_at:.0f} s after node 3 was killed:\n{text()}")
        assert ended[0] - killed_at <= bound, (
            f"node 0 ended {ended[0] - killed_at:.0f} s after the kill:\n{text()}")
        # rank 0 names a lost rank of node 3, as WorkerLost does: "... [rank 6]" (found by the
        # heartbeat bound, or sooner by a transfer whose peer's socket closed)
        lost = re.findall(r"cloche rank 0: (.*\[rank (\d)\])", log0)
        assert lost and int(lost[0][1]) in (6, 7), f"rank 0 named no lost rank:\n{text()}"
        print(f"\nsaved after {killed_at - started:.0f} s; rank 0 gave up"
              f" {ended[0] - killed_at:.1f} s after the kill: {lost[0][0]}")
    finally:
        for p in procs:
            _stop(p)

    got = torch.load(out)
    assert got["world_size"] == 8 and got["plan"] == [1] * 8
    assert {got["owners"][f"layers.{i}.mlp.post"] for i in range(8)} == set(range(8))
    from tests.sharding.netns_job import everything

    want = everything(cloche.load(tiny8_dir))
    assert got["names"] == want["names"]
    assert torch.equal(got["logits"], want["logits"])
    assert got["loss"] == want["loss"]
    assert sorted(got["saved"]) == sorted(want["saved"])
    assert len(got["saved"]) > 8 * 12  # every canonical point of every block, and gradients
    for key, value in want["saved"].items():
        assert torch.equal(got["saved"][key], value), key
    for name, value in want["grads"].items():
        assert torch.equal(got["grads"][name], value), name
    assert sorted(got["reducers"]) == sorted(want["reducers"]) and len(want["reducers"]) == 16
    for name, value in want["reducers"].items():
        assert value.keys() == got["reducers"][name].keys()
        for field, tensor in value.items():
            assert torch.equal(got["reducers"][name][field], tensor), (name, field)
