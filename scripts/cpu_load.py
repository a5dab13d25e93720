#!/usr/bin/env python3
"""Keep CPU cores busy with pure CPU work: a load generator for checking tests on a busy machine.

    python scripts/cpu_load.py                  # os.cpu_count() busy processes until stopped
    python scripts/cpu_load.py -n 2 --seconds 60

Starts N processes that each spin on integer arithmetic (no I/O, no sleeping, next to no
memory) at normal priority, so they compete with everything else for every core. Prints one
line, ``busy: N processes``, once all of them are running (a driver can wait for it), and stops
them on SIGINT/SIGTERM, after ``--seconds``, or when this process dies (each worker checks
that its parent is still alive).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
from typing import Any

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def spin(parent: int, started: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group: the parent decides
    started.set()
    x = 1
    while True:
        for _ in range(200_000):
            x = (x * 1_103_515_245 + 12_345) & 0x7FFF_FFFF
        if os.getppid() != parent:  # orphaned: the parent was killed without cleaning up
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="cpu_load.py", description=__doc__.split("\n\n")[0],
        epilog="Stop it with Ctrl-C or SIGTERM; it stops its workers and exits 0.")
    parser.add_argument("-n", "--processes", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="busy processes to run (default: os.cpu_count(), here "
                             f"{os.cpu_count()})")
    parser.add_argument("--seconds", type=float, default=None, metavar="S",
                        help="stop after S seconds (default: run until stopped)")
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")

    ctx = multiprocessing.get_context("spawn")
    workers = []
    try:
        for _ in range(args.processes):
            started = ctx.Event()
            proc = ctx.Process(target=spin, args=(os.getpid(), started), daemon=True)
            proc.start()
            workers.append((proc, started))
        for proc, started in workers:
            while not started.wait(0.5):
                if not proc.is_alive():
                    print(f"cpu_load: a worker exited with {proc.exitcode}", file=sys.stderr)
                    return 1
        # blocked only now: the workers must not inherit a mask that hides SIGTERM from them
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        print(f"busy: {len(workers)} processes", flush=True)
        if args.seconds is None:
            signal.sigwait(STOP_SIGNALS)
        else:
            signal.sigtimedwait(STOP_SIGNALS, args.seconds)
    finally:
        for proc, _ in workers:
            proc.terminate()
        for proc, _ in workers:
            proc.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())
