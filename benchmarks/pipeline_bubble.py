"""The pipeline bubble, on paper and measured: ``run`` and ``run_dataset`` at world size 2 and 4.

    python benchmarks/pipeline_bubble.py [--rounds 5] [--batches 8] [--batch 16] [--seq 64]

A layer pipeline of p equal stages that is fed u micro-batches in a row is idle for a fraction
(p - 1) / (u + p - 1) of its time (the fill and drain "bubble"), so its throughput relative to
one process doing all the work is at best p * u / (u + p - 1) — and never more than the number
of cores c the ranks share: predicted speed-up = min(c, p * u / (u + p - 1)).

- ``run(batch, micro_batches=m)``: one batch split in m micro-batches, u = m (the textbook case);
- ``run_dataset(..., micro_batches=m)`` over N batches: every rank streams from one batch to the
  next without waiting, so the pipeline sees u = N * m micro-batches in a row.

The model is a GPT-2 architecture of 8 equal blocks (d_model 256, vocab 512, so the embedding
and unembedding barely weigh), built from a config with random weights and saved to a
temporary directory; the plans are [4, 4] and [2, 2, 2, 2]. Every rank and the world-size-1
baseline run one torch thread. World size 2 and 4 are measured one after the other (a process
joins one group at a time), each interleaved with its own world-size-1 baseline; a case's
figure is the median over rounds of its per-round ratio to the baseline (wall clock).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Case, fix_threads, load_average, measure, paired_ratio

import cloche
from cloche.data import Dataset
from cloche.sharding.launch import start_local

N_LAYERS = 8


def predicted(p: int, u: int, cores: int) -> float:
    """Ideal speed-up of p equal stages over one process for u micro-batches on ``cores``."""
    return min(cores, p * u / (u + p - 1))


def bubble(p: int, u: int) -> float:
    return (p - 1) / (u + p - 1)


def build_model(directory: str) -> None:
    config = transformers.GPT2Config(n_layer=N_LAYERS, n_embd=256, n_head=4, n_positions=128,
                                     vocab_size=512, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batches", type=int, default=8, help="N: batches per dataset run")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--worlds", default="2,4")
    parser.add_argument("--micro", default="1,4,8")
    args = parser.parse_args()
    fix_threads(1)
    cores = os.cpu_count() or 1
    worlds = [int(w) for w in args.worlds.split(",")]
    micro = [int(m) for m in args.micro.split(",")]
    print(f"{cores} cores; load average before: {load_average()}; torch {torch.__version__}",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        build_model(directory)
        local = cloche.load(directory)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 512, (args.batch, args.seq), generator=g)
        examples = torch.randint(3, 512, (args.batches * args.batch, args.seq), generator=g)
        dataset = Dataset(examples.tolist(), name="bubble", seq_len=args.seq, pad_id=0)
        point = f"layers.{N_LAYERS - 1}.resid_post"

        def stat(ctx, x):
            ctx.reduce("mean", x, cloche.Mean())

        def dataset_run(model, m):
            def go():
                model.save_context("bubble").clear()
                model.run_dataset(dataset, probes={point: stat}, save="bubble",
                                  batch_size=args.batch, micro_batches=m)
            return go

        def one_run(model, m):
            return lambda: model.run(ids, return_logits=False, micro_batches=m)

        for p in worlds:
            dist = start_local(directory, p, threads=1, timeout_s=120)
            try:
                plan = dist.info()["layers_per_rank"]
                cases = [Case("ws1 run", one_run(local, 1)),
                         Case("ws1 dataset", dataset_run(local, 1))]
                for m in micro:
                    cases.append(Case(f"ws{p} run m={m}", one_run(dist, m)))
                    cases.append(Case(f"ws{p} dataset m={m}", dataset_run(dist, m)))
                timings = {t.case.name: t for t in measure(
                    cases, rounds=args.rounds, warmup=args.warmup,
                    progress=lambda s, p=p: print(f"  ws{p}: {s}", file=sys.stderr, flush=True))}
            finally:
                dist.close()
            for m in micro:
                for kind, u in (("run", m), ("dataset", args.batches * m)):
                    t = timings[f"ws{p} {kind} m={m}"]
                    base = timings[f"ws1 {kind}"]
                    rows.append((p, plan, kind, m, u, bubble(p, u), predicted(p, u, cores),
                                 1 / paired_ratio(t, base), t.median()))
    print(f"load average after: {load_average()}")
    print(f"model: GPT-2 architecture, {N_LAYERS} blocks, d_model 256; batch {args.batch}x"
          f"{args.seq}; dataset {args.batches} batches; {args.rounds} rounds; 1 thread per rank")
    print("| p | plan | call | m | u | bubble (p-1)/(u+p-1) | predicted speed-up"
          f" min({cores}, pu/(u+p-1)) | measured speed-up vs ws1 | measured / predicted |"
          " median s |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for p, plan, kind, m, u, b, pred, got, median in rows:
        call = "run (1 batch)" if kind == "run" else f"run_dataset ({args.batches} batches)"
        print(f"| {p} | {plan} | {call} | {m} | {u} | {b:.3f} | {pred:.2f} | {got:.2f} |"
              f" {got / pred:.2f} | {median:.3f} |")


if __name__ == "__main__":
    main()
