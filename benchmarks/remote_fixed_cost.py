"""What a request costs remote over local when the work is (nearly) nothing.

A real ``cloche.server.Server`` on 127.0.0.1 in this process beside a local model loaded from
the same directory (the workloads' 4-layer GPT-2); each round times ``--calls`` calls of each
request on both, back to back, and the figure is the median over rounds of (remote − local)
CPU time per call — paired rounds, so that load from other jobs on a shared machine mostly
cancels. This process runs client and server, so its CPU time counts both sides.

    PYTHONPATH=$PWD python benchmarks/remote_fixed_cost.py [--rounds 20 --calls 50]

With ``PYTHONPATH`` set to another checkout the same script times that checkout (before/after).
``--per-thread N`` instead runs each request N times remotely and N times locally and prints
the CPU time per call of every thread (client, connection, worker, ...), from the threads' own
CPU clocks: where the remote − local difference is spent.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from probe_overhead import build_model

import cloche
from cloche.server import Server, ServerConfig

TOKEN = "remote-fixed-cost-benchmark-token"


def noop(ctx: Any, x: torch.Tensor) -> None:
    return None


def saver(ctx: Any, x: torch.Tensor) -> None:
    ctx.save("x", x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--per-thread", type=int, default=0, metavar="N",
                        help="print each thread's CPU per call over N calls instead")
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        directory = Path(tmp)
        build_model(directory, layers=4, d_model=256, heads=4, vocab=4096, seq=128, seed=0)
        server = Server(cloche.load(directory), ServerConfig(token=TOKEN, port=0))
        host, port = server.start()
        stack.callback(server.shutdown)
        remote = cloche.connect(f"{host}:{port}", token=TOKEN)
        stack.callback(remote.close)
        models = {"local": cloche.load(directory), "remote": remote}
        ids = torch.randint(2, 4096, (1, 8), generator=torch.Generator().manual_seed(0))
        for model in models.values():
            model.run(ids, probes={"layers.0.mlp.post": saver}, save="small",
                      return_logits=False)
        work: dict[str, Callable[[cloche.Model], Any]] = {
            "run (1×8 tokens, no logits)": lambda m: m.run(ids, return_logits=False),
            "run + one shipped probe": lambda m: m.run(
                ids, probes={"layers.0.mlp.post": noop}, return_logits=False),
            "fetch a saved (1, 8, 1024) tensor": lambda m: m.save_context("small").fetch("x"),
            "ping": lambda m: m.ping(),
        }
        if args.per_thread:
            per_thread(work, models, args.per_thread)
            return
        diffs: dict[str, list[float]] = {label: [] for label in work}
        local_ms: dict[str, list[float]] = {label: [] for label in work}
        for fn in work.values():
            for model in models.values():
                fn(model)  # warm-up
        for _ in range(args.rounds):
            for label, fn in work.items():
                took = {}
                for place, model in models.items():
                    start = time.process_time()
                    for _ in range(args.calls):
                        fn(model)
                    took[place] = (time.process_time() - start) / args.calls * 1e3
                diffs[label].append(took["remote"] - took["local"])
                local_ms[label].append(took["local"])
    print(f"cloche from {cloche.__file__}; {args.rounds} paired rounds of {args.calls} calls;"
          " CPU ms per call (client and server in this process)")
    print("| request | local (median) | remote − local (median of rounds) | p25–p75 |")
    print("| --- | ---: | ---: | ---: |")
    for label, values in diffs.items():
        q = statistics.quantiles(values, n=4)
        print(f"| {label} | {statistics.median(local_ms[label]):.3f} |"
              f" {statistics.median(values):+.3f} | {q[0]:+.3f} – {q[2]:+.3f} |")


def _thread_clocks() -> dict[str, float]:
    """Each live thread's CPU time (s), by name without its peer (``cloche-conn``, ...)."""
    clocks = {}
    for thread in threading.enumerate():
        if thread.ident is None:
            continue
        try:
            clock = time.pthread_getcpuclockid(thread.ident)
            clocks["-".join(thread.name.split("-")[:2])] = time.clock_gettime(clock)
        except OSError:  # it ended meanwhile
            continue
    return clocks


def per_thread(work: dict[str, Callable[[cloche.Model], Any]],
               models: dict[str, cloche.Model], calls: int) -> None:
    print(f"cloche from {cloche.__file__}; CPU ms per call by thread, {calls} calls each")
    print("| request | where | thread | ms per call |")
    print("| --- | --- | --- | ---: |")
    for label, fn in work.items():
        for place, model in models.items():
            before = _thread_clocks()
            for _ in range(calls):
                fn(model)
            after = _thread_clocks()
            for name, end in after.items():
                spent = (end - before.get(name, end)) / calls * 1e3
                if spent >= 0.001:
                    print(f"| {label} | {place} | {name} | {spent:.3f} |")


if __name__ == "__main__":
    main()
