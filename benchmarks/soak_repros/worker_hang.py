"""Found by benchmarks/soak.py: the server's worker thread hangs for good after a cancel.

Same setting as cross_session_cancel.py: session A's dataset run is cancelled while the worker
serves session B between two of A's batches. If the worker is starting a thread at that moment,
A's interrupt (``PyThreadState_SetAsyncExc`` with the worker's thread id, cloche/runtime/
interrupt.py) lands in the *new* thread (its thread state apparently still carries the id of the
thread that starts it, and is found first): it dies in ``Thread._bootstrap`` with
``UserCodeInterrupted`` before it signals that it started, and the worker waits in
``Thread.start()`` -> ``self._started.wait()`` forever. No more model work for any session
(queued requests never answer; light requests such as ``ping`` still do).

In the soak the thread being started was the ``cloche-interrupt`` watcher that
``interruptible()`` starts for B's own request (every heavy request starts one): the server hung
within a minute or two of 16 clients with cancels. Here B's shipped function starts threads in a
loop so that the window is hit at once (2 runs of 3 hung here; the other reproduces
cross_session_cancel.py).

    PYTHONPATH=. python benchmarks/soak_repros/worker_hang.py
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


def start_threads(model, seconds):  # B: starts (and joins) short threads for a while
    import threading as t
    import time as tm

    end, n = tm.monotonic() + seconds, 0
    while tm.monotonic() < end:
        worker = t.Thread(target=lambda: None)
        worker.start()
        worker.join()
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
fb = b.submit("call", start_threads, 3.0,
              on_event=lambda e: e.get("type") == "started" and started.set())
started.wait(60)  # B runs on the worker thread, between two batches of A
fa.cancel()
try:
    print("B returned:", fb.result(30))
except TimeoutError:
    print("B: no answer after 30 s")
except Exception as exc:  # noqa: BLE001 - the outcome
    print("B failed:", type(exc).__name__, "-", str(exc).splitlines()[0])
try:
    print("C (a new session) run:", cloche.connect(f"{host}:{port}", token=TOKEN).submit(
        "run", "def g():").result(30).logits.shape)
except TimeoutError:
    print("a new session's model.run: no answer after 30 s -- the worker is stuck:")
    import sys
    import traceback
    for thread in threading.enumerate():
        if thread.name == "cloche-worker":
            print("".join(traceback.format_stack(sys._current_frames()[thread.ident])[-3:]))
print("ping still answers:", a.ping(1))
