"""Where a sharded (world size 2) request's CPU goes, thread by thread, in both processes.

The workloads benchmark gives one CPU figure per sharded call (both processes together); this
one splits it by thread (each rank's main thread, gloo's loop threads, the control store's
thread, the pollers), from ``/proc/<pid>/task/<tid>`` through psutil, over ``--calls`` calls
after one warm-up. Same model as workloads.py (GPT-2 4×256, random weights, one torch thread
per rank). The figures in README.md, "Sharded: generation driven by rank 0", come from it:

    python benchmarks/sharded_threads.py generate --calls 10
    python benchmarks/sharded_threads.py run --calls 30      # a 1×8 run: the fixed cost
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probe_overhead import build_model

import cloche
from cloche.sharding import start_local


def thread_times(processes: list[psutil.Process]) -> dict[tuple[int, str, int], float]:
    """CPU seconds per (rank, thread name, thread id)."""
    out = {}
    for rank, process in enumerate(processes):
        for thread in process.threads():
            try:
                name = Path(f"/proc/{process.pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                name = "?"
            out[rank, name, thread.id] = thread.user_time + thread.system_time
    return out


def workload(name: str, d_model: int) -> Callable[[cloche.Model], Any]:
    torch.manual_seed(0)
    prompt = torch.randint(2, 4096, (1, 16))
    ids = torch.randint(2, 4096, (8, 128))
    vec = torch.randn(d_model)

    def add(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x + vec

    calls: dict[str, Callable[[cloche.Model], Any]] = {
        "generate": lambda m: m.generate(prompt, 32, probes={"layers.1.resid_post": add},
                                         progress=False).tokens,
        "steer": lambda m: m.run(ids, probes={"layers.1.resid_post": add},
                                 progress=False).logits,
        "run": lambda m: m.run(ids[:1, :8], return_logits=False, progress=False),
    }
    return calls[name]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", choices=["generate", "steer", "run"])
    p.add_argument("--calls", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    directory = Path(tempfile.mkdtemp())
    build_model(directory, layers=4, d_model=256, heads=4, vocab=4096, seq=128, seed=0)
    call = workload(args.work, 256)
    local = cloche.load(directory)
    sharded = start_local(directory, 2, threads=1)
    try:
        assert sharded.executor.group is not None
        processes = [psutil.Process(os.getpid())] + [
            psutil.Process(proc.pid) for proc in sharded.executor.group.processes.values()]
        for model in (local, sharded):
            call(model)
        start = time.process_time()
        for _ in range(args.calls):
            call(local)
        print(f"local: {1e3 * (time.process_time() - start) / args.calls:.1f} ms CPU per call")
        before, wall = thread_times(processes), time.perf_counter()
        for _ in range(args.calls):
            call(sharded)
        wall = time.perf_counter() - wall
        after = thread_times(processes)
        rows = sorted(((k, (v - before.get(k, 0.0)) / args.calls * 1e3) for k, v in after.items()),
                      key=lambda r: -r[1])
        for (rank, name, _), ms in rows:
            if ms >= 0.5:
                print(f"rank {rank} {name:18s} {ms:7.1f} ms")
        total = sum(ms for _, ms in rows)
        print(f"sharded ws2: {total:.1f} ms CPU per call (all threads), wall"
              f" {1e3 * wall / args.calls:.1f} ms; load average {os.getloadavg()}")
    finally:
        sharded.close()


if __name__ == "__main__":
    main()
