"""The unchanged server and client in front of a sharded model: the client cannot tell."""

from __future__ import annotations

import pytest
import torch

import cloche
from cloche.client.remote import connect
from cloche.server.app import Server
from cloche.server.config import ServerConfig
from cloche.sharding.launch import start_local
from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS


def keep_mlp(ctx, x):
    ctx.save("mlp", x[:, :, :8])
    ctx.reduce("stats", x, cloche.Variance())


def test_client_against_sharded_server(tiny4_dir):
    directory = tiny4_dir("llama")
    local = cloche.load(directory)
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    server = Server(model, ServerConfig(token="secret"))
    try:
        host, port = server.start()
        with connect((host, port), token="secret") as remote:
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
            model.group.kill(1)
            with pytest.raises(cloche.WorkerLost) as info:
                remote.run(inputs)
            assert info.value.rank == 1
    finally:
        server.shutdown()
        model.close()
