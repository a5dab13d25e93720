"""Median round trip of a trivial request (``model.ping()``) to a local ``cloche serve``.

Also measures a raw TCP echo of one small message between the same two processes' worth of
Python, as the floor. Target: cloche median <= 1 ms.

    python benchmarks/round_trip.py [--n 2000]
"""

from __future__ import annotations

import argparse
import pathlib
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the tiny test model and the server fixture live in tests/


ECHO_SERVER = """
import socket
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
conn, _ = listener.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(65536):
    conn.sendall(data)
"""


def raw_echo(n: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    times = []
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(n):
            start = time.perf_counter()
            sock.sendall(b"x" * 64)
            sock.recv(65536)
            times.append(time.perf_counter() - start)
    proc.wait(10)
    proc.stdout.close()
    return times


def cloche_ping(n: int, model_dir: pathlib.Path) -> list[float]:
    from cloche.client import connect
    from tests.conftest_server import ServerProcess

    token = secrets.token_urlsafe(16)
    server = ServerProcess(model_dir, token)
    times = []
    try:
        with connect(server.address, token=token) as model:
            for _ in range(100):
                model.ping()
            for _ in range(n):
                start = time.perf_counter()
                model.ping()
                times.append(time.perf_counter() - start)
    finally:
        server.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from tests.conftest_server import save_tiny_gpt2_with_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_gpt2_with_tokenizer(pathlib.Path(tmp))
        raw = raw_echo(args.n)
        ours = cloche_ping(args.n, model_dir)
    raw_ms, ours_ms = statistics.median(raw) * 1e3, statistics.median(ours) * 1e3
    print(f"round trip of a trivial request, median of {args.n}")
    print(f"  raw TCP echo:  {raw_ms:.3f} ms")
    p90_ms = sorted(ours)[int(0.9 * len(ours))] * 1e3
    print(f"  cloche ping(): {ours_ms:.3f} ms  (p90 {p90_ms:.3f} ms, target <= 1 ms)")
    print(f"  ratio cloche/raw: {ours_ms / raw_ms:.1f}x")


if __name__ == "__main__":
    main()
