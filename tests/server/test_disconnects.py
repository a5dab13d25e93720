"""Clients that vanish: killed mid-run, reset mid-transfer. The server cancels their work,
frees their connection and serves the next client."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import textwrap

import cloche
import torch
from cloche.api.requests import Call, Context, Param
from cloche.client import connect

from tests.conftest_server import REPO
from tests.server.helpers import (
    InProcessServer,
    PeakRss,
    authenticated,
    hook_count,
    server_threads,
    wait_until,
)

CLIENT = textwrap.dedent(
    """
    import sys
    from cloche.client import connect

    model = connect(sys.argv[1], token=sys.argv[2])

    def keep(ctx, x):
        ctx.save("x", x)

    texts = ["def add(a, b):\\n    return a + b\\n"] * 50000
    future = model.submit("run_dataset", texts, probes={"layers.0.mlp.post": keep},
                          save="doomed", batch_size=1,
                          progress=lambda update: update["type"] == "progress"
                          and print("progress", flush=True))
    future.result()  # hours of work: the test kills this process while it waits here
    """
)


def test_client_killed_mid_run(served, server_model_dir):
    expected = cloche.load(server_model_dir).run("while True:")
    with connect(served.address, token=served.token) as watcher:
        threads_before = server_threads(watcher)
        env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
        proc = subprocess.Popen([sys.executable, "-c", CLIENT, served.address, served.token],
                                stdout=subprocess.PIPE, env=env)
        try:
            assert proc.stdout.readline().strip() == b"progress"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        # A 50k-example run that kept going would hold the worker for minutes; the next run
        # is answered promptly only because the dead client's run was cancelled.
        future = watcher.submit("run", "while True:")
        assert torch.equal(future.result(timeout=60).logits, expected.logits)
        assert hook_count(watcher) == 0
        assert wait_until(lambda: server_threads(watcher) <= threads_before)
    assert served.alive()


def test_client_reset_mid_transfer(served):
    with connect(served.address, token=served.token) as model:
        big = "shared/big-transfer"
        model.save_context(big).clear()
        model.run("x", probes={"embed": lambda ctx, x: ctx.save("t", torch.randn(2**23))},
                  save=big)  # 32 MiB
        threads_before = server_threads(model)
        for _ in range(3):
            framed = authenticated(served.address, served.token)
            framed.send({"kind": "request", "id": 1,
                         "op": Context(name=big, action="fetch", args=("t", "stack", None))})
            got = 0
            while got < 1 << 20:  # a megabyte into the 32 MiB reply...
                got += len(framed.sock.recv(65536))
            framed.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            framed.sock.close()  # ...and gone, with a reset
        fetched = model.save_context(big).fetch("t")
        assert fetched.shape == (1, 2**23)
        assert wait_until(lambda: server_threads(model) <= threads_before)
        model.save_context(big).clear()
    assert served.alive()


def big_result(model):
    return torch.zeros(2**24)  # 64 MiB: far more than the socket buffers hold


def test_a_client_that_stops_reading_does_not_block_the_others(served):
    # 20 replies of 64 MiB that are never read: buffered, they would cost the server 1.25 GiB.
    # The outbox of a connection holds at most max_outbox_bytes (256 MiB) beyond the frame in
    # flight; past that the server closes the connection and cancels its requests.
    stuck = authenticated(served.address, served.token)
    memory = PeakRss(served.proc.pid)
    try:
        for rid in range(1, 21):
            stuck.send({"kind": "request", "id": rid, "op": Call(fn=big_result)})
        stuck.send({"kind": "request", "id": 21, "op": Param(name="embed.W_E")})  # a light one
        with connect(served.address, token=served.token) as other:
            # round-robin: each run of this session lets one of the stuck session's go first,
            # so after 25 of them every stuck request has been run (or cancelled)
            for _ in range(25):
                assert other.submit("run", "def f():").result(timeout=60).logits.shape[0] == 1
        growth = memory.stop()
        assert growth < 640 * 2**20, f"the server grew by {growth / 2**20:.0f} MiB"
        # the server closed the stuck connection: what is left to read ends, well short of
        # the 1.25 GiB of replies (the closed connection's frames were dropped)
        stuck.sock.settimeout(60)
        received = 0
        try:
            while received < 2**30 and (chunk := stuck.sock.recv(1 << 20)):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < 512 * 2**20
    finally:
        memory.stop()
        stuck.close()
    assert served.alive()


def test_a_reply_bigger_than_the_outbox_bound_still_reaches_a_reading_client(server_model_dir):
    with InProcessServer(cloche.load(server_model_dir), max_outbox_bytes=2**20) as server, \
            connect(server.address, token=server.token) as model:
        for _ in range(2):
            assert model.call(big_result).shape == (2**24,)  # 64 MiB
        # light replies pipelined well past the bound: the client is slowed down, not dropped
        fetched = [model.executor.submit(Param(name="embed.W_E")) for _ in range(200)]  # 7 MiB
        assert all(f.result(timeout=60).shape == fetched[0].result().shape for f in fetched)
