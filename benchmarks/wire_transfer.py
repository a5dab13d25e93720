"""Fetch a 1 GiB saved tensor over loopback vs a raw socket moving the same bytes.

Both sides run in separate processes in the same run: a ``cloche serve`` subprocess holding a
1 GiB save context, fetched with ``handle.fetch(key, mode="list")``; and a bare Python
subprocess that ``sendall``s 1 GiB which this process ``recv_into``s a preallocated buffer.
Prints both throughputs and their ratio (target: cloche >= 0.7 of raw).

    python benchmarks/wire_transfer.py [--gib 1] [--repeats 3]
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
sys.path.insert(0, str(ROOT))

from cloche.client import connect  # noqa: E402
from tests.conftest_server import ServerProcess, save_tiny_gpt2_with_tokenizer  # noqa: E402

RAW_SERVER = """
import socket, sys
n = int(sys.argv[1])
data = bytearray(n)
data[::4096] = b"x" * len(data[::4096])
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = listener.accept()
    conn.sendall(memoryview(data))
    conn.close()
"""


def raw_fetch_seconds(nbytes: int, repeats: int) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(nbytes), str(repeats)],
                            stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    times = []
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                buf = torch.empty(nbytes, dtype=torch.uint8)  # same allocation as cloche's
                view = memoryview(buf.numpy())
                got = 0
                while got < nbytes:
                    n = sock.recv_into(view[got:], min(nbytes - got, 64 << 20))
                    if n == 0:
                        raise RuntimeError("raw server closed early")
                    got += n
            times.append(time.perf_counter() - start)
    finally:
        proc.wait(30)
        proc.stdout.close()
    return times


def cloche_fetch_seconds(nbytes: int, repeats: int, model_dir: pathlib.Path) -> list[float]:
    token = secrets.token_urlsafe(16)
    server = ServerProcess(model_dir, token)
    times = []
    try:
        with connect(server.address, token=token) as model:
            numel = nbytes // 4

            def fill(ctx, x):
                ctx.save("big", torch.ones(numel))

            model.run("x", probes={"embed": fill}, save="bench")
            handle = model.save_context("bench")
            for _ in range(repeats):
                start = time.perf_counter()
                (tensor,) = handle.fetch("big", mode="list")
                times.append(time.perf_counter() - start)
                assert tensor.numel() == numel
                del tensor
            handle.clear()
    finally:
        server.stop()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30) // 4 * 4
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_gpt2_with_tokenizer(pathlib.Path(tmp))
        raw = raw_fetch_seconds(nbytes, args.repeats)
        ours = cloche_fetch_seconds(nbytes, args.repeats, model_dir)
    gib = nbytes / 2**30
    raw_best, ours_best = min(raw), min(ours)
    print(f"transfer of {gib:.2f} GiB over loopback (best of {args.repeats})")
    print(f"  raw socket sendall/recv_into: {raw_best:.3f} s  ({gib / raw_best:.2f} GiB/s)"
          f"  median {statistics.median(raw):.3f} s")
    print(f"  cloche fetch:                 {ours_best:.3f} s  ({gib / ours_best:.2f} GiB/s)"
          f"  median {statistics.median(ours):.3f} s")
    print(f"  ratio cloche/raw throughput: {raw_best / ours_best:.2f}  (target >= 0.70)")


if __name__ == "__main__":
    main()
