"""Fetch a 1 GiB saved tensor over loopback vs a raw socket moving the same bytes.

Both peers run as separate processes in the same run, timed in interleaved rounds: a
``cloche serve`` subprocess holding a 1 GiB save context, fetched with
``handle.fetch(key, mode="list")``; and a bare Python subprocess that ``sendall``s 1 GiB which
this process ``recv_into``s a freshly allocated ``torch.empty`` buffer (as cloche does).
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
sys.path.insert(0, str(ROOT))  # the tiny test model and the server fixture live in tests/


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


class RawPeer:
    """A bare Python process that sends the same number of bytes on every connection."""

    def __init__(self, nbytes: int, repeats: int) -> None:
        self.nbytes = nbytes
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_SERVER, str(nbytes), str(repeats)],
                                     stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())

    def fetch(self) -> float:
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            buf = torch.empty(self.nbytes, dtype=torch.uint8)  # the same allocation as cloche's
            view = memoryview(buf.numpy())
            got = 0
            while got < self.nbytes:
                n = sock.recv_into(view[got:], min(self.nbytes - got, 64 << 20))
                if n == 0:
                    raise RuntimeError("raw server closed early")
                got += n
        return time.perf_counter() - start

    def close(self) -> None:
        self.proc.wait(30)
        self.proc.stdout.close()


class ClochePeer:
    """A ``cloche serve`` process holding one tensor of ``nbytes`` in a save context."""

    def __init__(self, nbytes: int, model_dir: pathlib.Path) -> None:
        from cloche.client import connect
        from tests.conftest_server import ServerProcess

        token = secrets.token_urlsafe(16)
        self.server = ServerProcess(model_dir, token)
        self.model = connect(self.server.address, token=token)
        self.numel = nbytes // 4
        numel = self.numel

        def fill(ctx, x):
            ctx.save("big", torch.ones(numel))

        self.model.run("x", probes={"embed": fill}, save="bench")
        self.handle = self.model.save_context("bench")

    def fetch(self) -> float:
        start = time.perf_counter()
        (tensor,) = self.handle.fetch("big", mode="list")
        elapsed = time.perf_counter() - start
        assert tensor.numel() == self.numel
        return elapsed

    def close(self) -> None:
        self.handle.clear()
        self.model.close()
        self.server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    nbytes = int(args.gib * 2**30) // 4 * 4
    torch.set_num_threads(1)
    from tests.conftest_server import save_tiny_gpt2_with_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_gpt2_with_tokenizer(pathlib.Path(tmp))
        raw_peer, cloche_peer = RawPeer(nbytes, args.repeats), ClochePeer(nbytes, model_dir)
        raw, ours = [], []
        try:
            for i in range(args.repeats):  # interleaved, alternating order: drifts in load cancel
                if i % 2:
                    ours.append(cloche_peer.fetch())
                    raw.append(raw_peer.fetch())
                else:
                    raw.append(raw_peer.fetch())
                    ours.append(cloche_peer.fetch())
        finally:
            raw_peer.close()
            cloche_peer.close()
    gib = nbytes / 2**30
    raw_best, ours_best = min(raw), min(ours)
    print(f"transfer of {gib:.2f} GiB over loopback (best of {args.repeats})")
    print(f"  raw socket sendall/recv_into: {raw_best:.3f} s  ({gib / raw_best:.2f} GiB/s)"
          f"  median {statistics.median(raw):.3f} s")
    print(f"  cloche fetch:                 {ours_best:.3f} s  ({gib / ours_best:.2f} GiB/s)"
          f"  median {statistics.median(ours):.3f} s")
    print(f"  ratio cloche/raw throughput: {raw_best / ours_best:.2f} best,"
          f" {statistics.median(raw) / statistics.median(ours):.2f} median  (target >= 0.70)")


if __name__ == "__main__":
    main()
