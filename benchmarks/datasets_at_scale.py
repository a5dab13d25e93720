"""Datasets at scale on a real server: a memory-mapped token file through ``run_dataset`` with a
Mean reducer (server memory over time), and an activation export killed with SIGKILL half-way
and resumed after a restart (throughput against the forward alone; the resumed export checked).

Everything runs against ``python -m cloche serve`` (the default model) in a subprocess with
``--state-dir`` and ``--threads``; the client is this process. Phases, in order:

1. *forward alone*: ``run_dataset(tokens, limit=export examples)`` with no probes.
2. *export*: the same examples with ``export=dir, export_points=[POINT], export_dtype=float16``;
   when half of the shards are on disk the server is killed (SIGKILL), restarted on the same
   ``--state-dir`` and port, and the same call is made again: it skips the complete shards.
   Then the forward alone again, over the examples the resumed export ran.
3. *check*: the manifest is complete; the shards' ``example_ids``/``positions`` are exactly every
   token of every example, once, in order; three shards (first, one written after the restart,
   last) match the activations of a local ``cloche.load()`` of the same model (float16
   tolerance: the server is another process).
4. *Mean*: ``run_dataset(tokens, probes={POINT: mean})`` over the whole token file; the server's
   RSS (``/proc/PID/status``) is sampled every ``--sample-s`` seconds.

Throughput is given per wall second and per CPU second of the server process (utime + stime of
all its threads, from ``/proc/PID/stat``): on a shared machine the CPU figure measures the work,
the wall figure also the wait for a core. Results go to stdout (markdown) and ``--out`` (JSON).

    python benchmarks/datasets_at_scale.py --tokens 10000000 --export-tokens 2000000 \\
        --threads 1 --out /tmp/datasets_at_scale.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
POINT = "layers.1.resid_post"


class Server:
    """``python -m cloche serve`` (the default model) in a subprocess."""

    def __init__(self, token: str, state: Path, threads: int, port: int = 0) -> None:
        env = dict(os.environ, CLOCHE_TOKEN=token, OMP_NUM_THREADS=str(threads),
                   PYTHONUNBUFFERED="1",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloche", "serve", "--port", str(port), "--threads",
             str(threads), "--state-dir", str(state), "--log-level", "WARNING"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=str(REPO))
        assert self.proc.stdout is not None
        self.address = ""
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").strip()
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                break
        if not self.address:
            raise RuntimeError(f"the server exited with {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout or []],
                         daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def rss(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def timed(server: Server, fn: Any) -> tuple[Any, float, float]:
    """``fn()``, its wall seconds and the server's CPU seconds meanwhile."""
    cpu, wall = server.cpu_s(), time.perf_counter()
    value = fn()
    return value, time.perf_counter() - wall, server.cpu_s() - cpu


def mean_probe(ctx: Any, x: torch.Tensor) -> None:
    import cloche

    ctx.reduce("mean", x, cloche.Mean())


def shards_of(folder: Path) -> list[dict[str, Any]]:
    path = folder / "manifest.json"
    return json.loads(path.read_text())["shards"] if path.exists() else []


def check_export(folder: Path, n_examples: int, seq_len: int, tokens: np.ndarray,
                 threads: int, restart_shard: int) -> dict[str, Any]:
    """Every token once, in order; three shards against a local forward (fp16 tolerance)."""
    from safetensors.torch import load_file

    import cloche

    manifest = json.loads((folder / "manifest.json").read_text())
    expect_ids = np.repeat(np.arange(n_examples), seq_len)
    expect_pos = np.tile(np.arange(seq_len), n_examples)
    at, total_bytes = 0, 0
    for shard in manifest["shards"]:
        t = load_file(folder / shard["file"])
        n = t["example_ids"].shape[0]
        assert np.array_equal(t["example_ids"].numpy(), expect_ids[at:at + n]), shard["file"]
        assert np.array_equal(t["positions"].numpy(), expect_pos[at:at + n]), shard["file"]
        assert t[POINT].dtype == torch.float16 and t[POINT].shape[0] == n
        at += n
        total_bytes += (folder / shard["file"]).stat().st_size
    assert at == n_examples * seq_len, (at, n_examples * seq_len)
    torch.set_num_threads(threads)
    model = cloche.load()
    worst, scale = 0.0, 0.0
    picks = sorted({0, restart_shard, len(manifest["shards"]) - 1})
    for k in picks:
        shard = manifest["shards"][k]
        first, stop = shard["examples"]
        got = load_file(folder / shard["file"])[POINT].float()
        ids = torch.from_numpy(tokens[first * seq_len:stop * seq_len].astype(np.int64))
        model.run(ids.view(-1, seq_len), probes={POINT: lambda ctx, x: ctx.save("x", x)},
                  save="check", return_logits=False)
        want = model.save_context("check").fetch("x").reshape(-1, got.shape[1])
        model.save_context("check").clear()
        worst = max(worst, float(((got - want).abs() / (want.abs() + 1e-3)).max()))
        scale = max(scale, float(want.abs().max()))
    assert worst < 2e-3, worst  # float16 rounding is at most 2**-11 of the value
    return {"shards": len(manifest["shards"]), "complete": manifest["complete"],
            "tokens": at, "bytes": total_bytes, "checked_shards": picks,
            "max_rel_diff_vs_local_fp32": worst, "max_abs_activation": scale}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--export-tokens", type=int, default=2_000_000)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sample-s", type=float, default=1.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip", default="", help="comma list of phases to skip: export,mean")
    args = parser.parse_args()
    import cloche

    work = Path(args.workdir or tempfile.mkdtemp(prefix="cloche-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    state, token = work / "state", secrets.token_urlsafe(16)
    results: dict[str, Any] = {"args": vars(args), "load_average": os.getloadavg()}

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1, default=str))

    path = work / "tokens.npy"
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, size=args.tokens, dtype=np.uint16)  # the default model's vocab
    np.save(path, ids)
    name = f"{path}?seq_len={args.seq_len}"
    n_export = args.export_tokens // args.seq_len
    run = {"batch_size": args.batch_size, "progress": False}
    server = Server(token, state, args.threads)
    try:
        model = cloche.connect(server.address, token=token)
        if "export" not in args.skip:
            out, wall, cpu = timed(server, lambda: model.run_dataset(name, limit=n_export, **run))
            results["forward_alone"] = {"tokens": out["tokens"], "wall_s": wall, "cpu_s": cpu}
            print(f"forward alone: {out['tokens']} tokens, {wall:.1f} s wall, {cpu:.1f} s cpu",
                  flush=True)
            save()
            folder = work / "export"
            export = {"export": str(folder), "export_points": [POINT],
                      "export_dtype": "float16", "limit": n_export, **run}
            per_shard = math.ceil((1 << 16) / (args.batch_size * args.seq_len))
            n_shards = math.ceil(math.ceil(n_export / args.batch_size) / per_shard)
            cpu0, wall0 = server.cpu_s(), time.perf_counter()
            future = model.submit("run_dataset", name, **export)
            while len(shards_of(folder)) < n_shards // 2 and not future.done():
                time.sleep(0.2)
            first_shards = len(shards_of(folder))
            first = {"shards": first_shards, "wall_s": time.perf_counter() - wall0,
                     "cpu_s": server.cpu_s() - cpu0,
                     "tokens": sum(s["tokens"] for s in shards_of(folder))}
            server.kill9()
            print(f"killed (SIGKILL) after {first_shards}/{n_shards} shards", flush=True)
            future.exception(timeout=120)
            server = Server(token, state, args.threads, port=server.port)
            out, wall, cpu = timed(server, lambda: model.run_dataset(name, **export))
            resumed = {"tokens": out["tokens"], "examples": out["examples"], "wall_s": wall,
                       "cpu_s": cpu, "export": out["export"]}
            start = n_export - out["examples"]
            after, fwall, fcpu = timed(server, lambda: model.run_dataset(
                f"{path}?seq_len={args.seq_len}", limit=n_export, **run))
            results["export"] = {"first_run_until_kill": first, "resumed": resumed,
                                 "forward_alone_again": {"tokens": after["tokens"],
                                                         "wall_s": fwall, "cpu_s": fcpu},
                                 "resumed_from_example": start}
            save()
            results["export"]["check"] = check_export(folder, n_export, args.seq_len, ids,
                                                      args.threads, first_shards)
            print(json.dumps(results["export"], indent=1), flush=True)
            save()
        if "mean" not in args.skip:
            samples: list[tuple[float, int]] = []
            events: list[tuple[float, int]] = []
            stop = threading.Event()
            t0 = time.perf_counter()
            rss_before = server.rss()

            def sample() -> None:
                while not stop.wait(args.sample_s):
                    samples.append((time.perf_counter() - t0, server.rss()))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            out, wall, cpu = timed(server, lambda: model.run_dataset(
                name, probes={POINT: mean_probe}, save="mean", batch_size=args.batch_size,
                progress=lambda e: e.get("type") == "progress" and events.append(
                    (time.perf_counter() - t0, e["done"]))))
            stop.set()
            sampler.join()
            mean = out["reducers"]["mean"]["mean"]
            rss = [r for _, r in samples]
            tenth = max(1, len(rss) // 10)
            results["mean"] = {
                "tokens": out["tokens"], "examples": out["examples"], "wall_s": wall,
                "cpu_s": cpu, "rss_before_run": rss_before, "rss_min": min(rss),
                "rss_max": max(rss), "rss_first_tenth_max": max(rss[:tenth]),
                "rss_last_tenth_max": max(rss[-tenth:]),
                "rss_deciles": [rss[min(len(rss) - 1, i * len(rss) // 10)] for i in range(11)],
                "samples": len(rss), "mean_finite": bool(torch.isfinite(mean).all()),
                "progress_events": len(events)}
            print(json.dumps(results["mean"], indent=1), flush=True)
            save()
        model.close()
    finally:
        server.stop()
    save()


if __name__ == "__main__":
    main()
