"""The unchanged server and client in front of a sharded model: the client cannot tell."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import cloche
import pytest
import torch
from cloche.client.executor import connect
from cloche.server.app import Server
from cloche.server.config import ServerConfig
from cloche.sharding.launch import start_local

from tests.conftest_server import REPO, ServerProcess
from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS


def keep_mlp(ctx, x):
    ctx.save("mlp", x[:, :, :8])
    ctx.reduce("stats", x, cloche.Variance())


def test_client_against_sharded_server(tiny4_dir):
    directory = tiny4_dir("llama")
    local = cloche.load(directory)
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    server = Server(model, ServerConfig(token="sharded-server-token"))
    try:
        host, port = server.start()
        with connect((host, port), token="sharded-server-token") as remote:
            inputs = ids_batch(seed=12)
            got = remote.run(inputs, probes={"layers.3.mlp.post": keep_mlp}, save="acts")
            want = local.run(inputs, probes={"layers.3.mlp.post": keep_mlp}, save="acts")
            torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
            ctx = remote.save_context("acts")
            torch.testing.assert_close(ctx.fetch("mlp"), local.save_context("acts").fetch("mlp"),
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(ctx.result("stats")["var"],
                                       local.save_context("acts").result("stats")["var"],
                                       atol=1e-5, rtol=0)
            per_rank = remote.call(lambda m: m.rank, rank="all")
            assert per_rank == {0: 0, 1: 1}
            model.executor.group.kill(1)
            with pytest.raises(cloche.WorkerLost) as info:
                remote.run(inputs)
            assert info.value.rank == 1
    finally:
        server.shutdown()
        model.close()


def test_cloche_serve_under_torchrun_serves_clients_and_shuts_down_cleanly(
        tiny4_dir, monkeypatch, tmp_path):
    """``cloche serve --torchrun`` on each rank, as torchrun would start them: rank 0 serves,
    a client's results match the local model, and SIGTERM to rank 0 ends both ranks with 0."""
    directory = tiny4_dir("gpt2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rendezvous = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    flags = ["--torchrun", "--store-port-offset", "0", "--worker-timeout", "30"]
    with open(tmp_path / "rank1.log", "wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "cloche", "serve", "--model", str(directory), *flags],
            env={**os.environ, **rendezvous, "RANK": "1", "CLOCHE_TOKEN": "torchrun-test-token"},
            stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        for key, value in {**rendezvous, "RANK": "0"}.items():
            monkeypatch.setenv(key, value)
        server = ServerProcess(directory, "torchrun-test-token", *flags,
                               log_path=tmp_path / "rank0.log")
        try:
            with connect(server.address, token=server.token) as remote:
                assert remote.world_size == 2
                inputs = ids_batch(seed=5)
                got = remote.run(inputs, probes={"layers.3.mlp.post": keep_mlp}, save="acts")
                want = cloche.load(directory).run(inputs)
                torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(timeout=120) == 0
            assert worker.wait(timeout=120) == 0, (tmp_path / "rank1.log").read_text()[-3000:]
        finally:
            server.stop()
            if worker.poll() is None:
                worker.kill()
                worker.wait()


def test_a_principals_cap_holds_on_every_rank(tiny4_dir):
    from cloche.server.principals import Principal

    alice = Principal("alice", "alice-token-0123456789", max_saved_bytes=4096)
    bob = Principal("bob", "bob-token-0123456789abc")
    model = start_local(tiny4_dir("llama"), 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    server = Server(model, ServerConfig(principals=(alice, bob)))

    def big(ctx, x):
        ctx.save("big", torch.zeros(2048))  # 8 KiB

    try:
        address = server.start()
        assert model.owner_of("layers.3.resid_post") == 1
        with connect(address, token=alice.token) as a, connect(address, token=bob.token) as b:
            with pytest.raises(cloche.ResourceLimit, match="principal 'alice'"):
                a.run(ids_batch(seed=1), probes={"layers.3.resid_post": big}, save="c")
            assert a.save_contexts() == []
            b.run(ids_batch(seed=1), probes={"layers.3.resid_post": big}, save="c")
            assert b.save_context("c").num_runs == 1 and a.save_contexts() == []
    finally:
        server.shutdown()
        model.close()
