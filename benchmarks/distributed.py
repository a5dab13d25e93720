"""Throughput of a sharded model (world size 2, gloo, CPU) against one process (world size 1).

    python benchmarks/distributed.py [--model DIR] [--rounds 5] [--batch 16] [--seq 128]

Uses the shipped default model unless ``--model`` is given. Cases, each timed once per round
in a shuffled order (median over rounds; ratios to the baseline are medians of per-round
ratios, which cancels slow drifts in background load):

- ``ws1, 1 thread``   local ``cloche.load`` model, ``model.run(batch)`` — the baseline
- ``ws1, 2 threads``  the same with 2 torch threads (all cores of a 2-core machine)
- ``ws2, run``        ``Model.run(batch)`` over two ranks, one thread per rank
- ``ws2, run, 4 mb``  the same batch split in 4 micro-batches so the ranks overlap
- ``ws1 dataset`` / ``ws2 dataset`` / ``ws2 dataset, 4 mb``: ``run_dataset`` over 8 batches
  with a ``Mean`` reducer at the last block's output (batches stream through the pipeline)

On a small machine sharding is for memory and scale, not speed: expect ratios below 1 here.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()

    import cloche
    from cloche.data import Dataset
    from cloche.sharding.launch import start_local

    torch.set_num_threads(1)
    if args.model is None:
        from cloche.default_model import weights_dir

        args.model = str(weights_dir())
    local = cloche.load(args.model)
    dist = start_local(args.model, 2, threads=1, timeout_s=60)
    try:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, local.d_vocab, (args.batch, args.seq), generator=g)
        examples = torch.randint(0, local.d_vocab, (8 * args.batch, args.seq), generator=g)
        dataset = Dataset(examples.tolist(), name="bench", seq_len=args.seq, pad_id=0)
        point = f"layers.{local.n_layers - 1}.resid_post"

        def stat(ctx, x):
            ctx.reduce("mean", x, cloche.Mean())

        def threads(n, fn):
            def run():
                previous = torch.get_num_threads()
                torch.set_num_threads(n)
                try:
                    fn()
                finally:
                    torch.set_num_threads(previous)
            return run

        def dataset_run(model, **kw):
            def run():
                model.save_context("bench").clear()
                model.run_dataset(dataset, probes={point: stat}, save="bench",
                                  batch_size=args.batch, **kw)
            return run

        cases = {
            "ws1, 1 thread": lambda: local.run(ids, return_logits=False),
            "ws1, 2 threads": threads(2, lambda: local.run(ids, return_logits=False)),
            "ws2, run": lambda: dist.run(ids, return_logits=False),
            "ws2, run, 4 mb": lambda: dist.run(ids, return_logits=False, micro_batches=4),
            "ws1 dataset": dataset_run(local),
            "ws1 dataset, 2 threads": threads(2, dataset_run(local)),
            "ws2 dataset": dataset_run(dist),
            "ws2 dataset, 4 mb": dataset_run(dist, micro_batches=4),
        }
        for fn in cases.values():  # warm up
            fn()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            order = list(cases)
            random.shuffle(order)
            for name in order:
                start = time.perf_counter()
                cases[name]()
                times[name].append(time.perf_counter() - start)
        tokens = {name: args.batch * args.seq * (8 if "dataset" in name else 1) for name in cases}
        print(f"model {local.name}: {local.n_layers} blocks, d_model {local.d_model};"
              f" batch {args.batch}x{args.seq}; {args.rounds} rounds; plan"
              f" {dist.info()['layers_per_rank']}")
        print(f"{'case':28s} {'median s':>9s} {'tokens/s':>10s} {'vs baseline':>12s}")
        for name in cases:
            base = "ws1 dataset" if "dataset" in name else "ws1, 1 thread"
            ratio = statistics.median(b / t for t, b in zip(times[name], times[base], strict=True))
            median = statistics.median(times[name])
            print(f"{name:28s} {median:9.4f} {tokens[name] / median:10.0f} {ratio:11.2f}x")
    finally:
        dist.close()


if __name__ == "__main__":
    main()
