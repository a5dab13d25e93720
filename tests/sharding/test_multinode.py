"""Two "machines" on this one: two network namespaces joined by a veth pair, one torchrun each.

Each namespace sees only its loopback and its end of the veth pair, so every byte between the
"nodes" (rendezvous, control store, gloo) crosses that pair. The job (``netns_job.serve``) runs
on rank 0 of the sharded model and its results must match world size 1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cloche
from tests.sharding.conftest import ids_batch
from tests.threads import TORCH_THREADS

ROOT = Path(__file__).resolve().parents[2]


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=False, capture_output=True, text=True)


@pytest.fixture
def namespaces():
    """Two namespaces a/b with a veth pair 10.231.<n>.1 <-> .2; removed afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (the ip command) is not installed")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = f"{os.getpid() % 10000}"
    a, b = f"cla{tag}", f"clb{tag}"
    subnet = f"10.231.{os.getpid() % 250}"
    made = []
    etc = Path("/etc/netns")
    try:
        for ns in (a, b):
            r = _ip("netns", "add", ns)
            if r.returncode != 0:
                pytest.skip(f"network namespaces are unavailable here: {r.stderr.strip()}")
            made.append(ns)
            # `ip netns exec` mounts these over /etc: names resolve locally, and lookups of the
            # peer's address fail at once instead of waiting on an unreachable DNS server
            (etc / ns).mkdir(parents=True, exist_ok=True)
            (etc / ns / "hosts").write_text(f"127.0.0.1 localhost\n{subnet}.1 node-a\n"
                                            f"{subnet}.2 node-b\n")
            (etc / ns / "resolv.conf").write_text("options timeout:1 attempts:1\n")
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
                pytest.skip(f"cannot build the veth pair ({' '.join(step)}): {r.stderr.strip()}")
        yield {"a": a, "b": b, "addr": f"{subnet}.1", "ifaces": (f"va{tag}", f"vb{tag}")}
    finally:
        for ns in made:
            _ip("netns", "del", ns)
            shutil.rmtree(etc / ns, ignore_errors=True)


def test_torchrun_across_two_namespaces(namespaces, tiny4_dir, tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    directory = tiny4_dir("gpt2")
    out = tmp_path / "netns.pt"
    procs = []
    for node, (ns, iface) in enumerate(zip((namespaces["a"], namespaces["b"]),
                                           namespaces["ifaces"])):
        env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME=iface,
                   CLOCHE_NETNS_OUT=str(out), OMP_NUM_THREADS=str(TORCH_THREADS))
        cmd = ["ip", "netns", "exec", ns, torchrun, "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--master-addr", namespaces["addr"],
               "--master-port", "29640", "-m", "cloche.sharding.worker", "--model", str(directory),
               "--timeout", "20", "--threads", str(TORCH_THREADS),
               "--serve", "tests.sharding.netns_job:serve"]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=150)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            tails = [q.communicate()[0][-2000:] for q in procs]
            pytest.fail("torchrun did not finish within 150 s:\n" + "\n---\n".join(tails))
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-4000:]
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
