"""Fixed bug, kept as a soak check: a queued run_dataset was sometimes answered "cancelled
while queued" although ``future.cancel()`` had returned False ("already done").

Cause (diagnosed 2026-11-30): ``RequestFuture.cancel()`` sent the cancel message first and
marked the future cancelled second; the server's immediate answer to a queued request's cancel
could reach the client's reader thread in between, resolve the future, and make ``cancel()``
report False for the request it had just stopped. ``cancel()`` now marks the future first;
the regression test is tests/api/test_futures.py (deterministic, no timing). This loop is the
load-dependent way it was first seen (iteration 129 of 150 with three CPU-bound load processes).

    PYTHONPATH=. python benchmarks/soak_repros/queued_run_reported_cancelled.py
"""

import subprocess
import sys
import threading

import torch

import cloche
from cloche.server import Server, ServerConfig
from tests.server.test_cancel import LONG, save_everything

TOKEN = "repro-token-0123456789abcdef"
torch.set_num_threads(1)
load = subprocess.Popen([sys.executable, "scripts/cpu_load.py", "-n", "3"],
                        stdout=subprocess.PIPE)
server = Server(cloche.load(), ServerConfig(token=TOKEN))
host, port = server.start()
model = cloche.connect(f"{host}:{port}", token=TOKEN)
try:
    for i in range(300):
        events: list[str] = []
        first = threading.Event()

        def seen(update, events=events, first=first):
            events.append(update["type"])
            first.set()

        future = model.submit("run_dataset", LONG, probes={"layers.0.mlp.post": save_everything},
                              save="c", batch_size=1, progress=seen)
        first.wait(60)
        if not future.cancel():
            print(f"iteration {i}: already done before the client cancelled; events {events};"
                  f" {future.exception(timeout=5)!r}")
            break
        try:
            future.result()
        except Exception:  # noqa: BLE001 - the cancellation, as expected
            pass
        model.run("x")
    else:
        print("not reproduced in 300 iterations")
finally:
    load.kill()
    model.close()
    server.shutdown()
