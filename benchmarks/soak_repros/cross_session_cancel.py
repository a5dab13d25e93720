"""Found by benchmarks/soak.py: cancelling one session's dataset run cancels another session's
request.

Between two batches of session A's ``run_dataset`` the server serves other sessions' requests on
the same worker thread (``Server._yielding``, cloche/server/app.py). A's request is inside
``interruptible(A.cancel)`` (cloche/runtime/executor.py ``execute``) for the whole run, nested
jobs included: when A cancels while B's request runs there, A's watcher raises
``UserCodeInterrupted`` in the worker thread 0.5 s later, and it lands in B's request. B gets
``Cancelled: UserCodeInterrupted ...`` though B cancelled nothing (in the soak: B's ``generate``,
``run`` or ``call``). Expected: B's request returns; A's run stops at its next batch.

    PYTHONPATH=. python benchmarks/soak_repros/cross_session_cancel.py
"""
import threading
import time

import cloche
from cloche.server.app import Server
from cloche.server.config import ServerConfig

TOKEN = "repro-token-0123456789abcdef"


def slow_mean(ctx, x):
    time.sleep(0.05)
    ctx.reduce("m", x, cloche.Mean())


def busy(model, seconds):  # B's request: 2 s of Python, no probes, nothing to do with A
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
    return n


server = Server(cloche.load(), ServerConfig(token=TOKEN))
host, port = server.start()
a = cloche.connect(f"{host}:{port}", token=TOKEN)
b = cloche.connect(f"{host}:{port}", token=TOKEN)
first = threading.Event()
fa = a.submit("run_dataset", ["def f(x):\n    return x\n"] * 64,
              probes={"layers.1.mlp.post": slow_mean}, save="a", batch_size=4,
              on_event=lambda e: e.get("type") == "progress" and first.set())
first.wait(60)
started = threading.Event()
fb = b.submit("call", busy, 2.0, on_event=lambda e: e.get("type") == "started" and started.set())
started.wait(60)  # B now runs on the worker thread, between two batches of A
fa.cancel()       # A cancels its own request
try:
    print("B returned:", fb.result(60))
except Exception as exc:  # noqa: BLE001 - the outcome
    print("B failed:", type(exc).__name__, "-", str(exc).splitlines()[0])
a.close()
b.close()
server.shutdown()
