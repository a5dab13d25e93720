#!/usr/bin/env python3
"""Run the whole test suite K times in a row while scripts/cpu_load.py keeps every core busy.

    python scripts/suite_under_load.py                 # 3 passes of `python -m pytest -q`
    python scripts/suite_under_load.py -k 5 -- -x tests/server
    python scripts/suite_under_load.py --no-load -k 1  # the same, on an idle machine

Starts the load, waits until it reports that it is running, runs the suite K times one after
another (each pass's full output goes to a log file), stops the load, and prints each pass's
pytest summary line, exit code and duration. Exits 0 only if every pass did.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"\b\d+ (passed|failed|errors?|skipped|xfailed|xpassed|deselected)\b.* in ")


def summary_line(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines()
    for line in reversed(lines):
        if SUMMARY.search(line):
            return line.strip("= ").strip()
    return lines[-1].strip() if lines else "(no output)"


def start_load(processes: int) -> subprocess.Popen:
    load = subprocess.Popen([sys.executable, str(REPO / "scripts" / "cpu_load.py"),
                             "-n", str(processes)], stdout=subprocess.PIPE, text=True)
    assert load.stdout is not None
    line = load.stdout.readline()  # "busy: N processes" once every worker runs
    if not line.startswith("busy:"):
        load.terminate()
        raise SystemExit(f"the load generator did not start (it said {line!r})")
    print(f"load: {line.strip()} (pid {load.pid})", flush=True)
    return load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="suite_under_load.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to pytest instead of the default `-q`.")
    parser.add_argument("-k", "--passes", type=int, default=3, metavar="K",
                        help="runs of the suite, one after another (default: 3)")
    parser.add_argument("-n", "--processes", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="busy processes for the load (default: os.cpu_count(), here "
                             f"{os.cpu_count()})")
    parser.add_argument("--no-load", action="store_true", help="run without the load")
    parser.add_argument("--log-dir", type=Path, default=None,
                        help="where pass-1.log ... go (default: a new temporary directory)")
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:
        pytest_args = pytest_args[1:]
    pytest_args = pytest_args or ["-q"]
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="suite-under-load-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pytest", *pytest_args]
    print(f"suite: {' '.join(command)} (in {REPO}); logs in {log_dir}", flush=True)

    load = None if args.no_load else start_load(args.processes)
    results = []
    try:
        for i in range(1, args.passes + 1):
            log = log_dir / f"pass-{i}.log"
            started = time.monotonic()
            with open(log, "wb") as out:
                code = subprocess.call(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            took = time.monotonic() - started
            load1 = os.getloadavg()[0]
            line = summary_line(log)
            results.append(code)
            print(f"pass {i}/{args.passes}: exit {code}, {took:.0f} s, load {load1:.1f}: {line}",
                  flush=True)
    finally:
        if load is not None:
            load.terminate()
            load.wait()
            print("load: stopped", flush=True)
    ok = all(code == 0 for code in results) and len(results) == args.passes
    print(f"{'all' if ok else 'NOT all'} {args.passes} passes succeeded "
          f"({'under load' if load is not None else 'no load'})", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
