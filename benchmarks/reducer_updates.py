"""CPU cost of one reducer step, as a probe's ``ctx.reduce`` pays it in a ``run``.

A ``run`` feeds each layer's activations to a fresh reducer (the transaction's staged one) and
merges it into the saved one when the run commits: per layer, one ``update`` of the batch and
one ``merge``. This times that pair for Mean, TopK(8), Histogram(64 bins) and Covariance on a
(8, 128, d) float32 batch with an all-true attention mask (what ``ctx.reduce`` passes), one
torch thread, beside the torch-only statistic the workloads' floor computes in its hook.

    PYTHONPATH=$PWD python benchmarks/reducer_updates.py [--rounds 15]

Run it with ``PYTHONPATH`` set to another checkout (``git archive <rev> | tar -x -C dir``) to
time that checkout's reducers with the same script (before/after).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import cloche


def _floor_topk(x: torch.Tensor, k: int = 8) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).topk(k, 0).values.to(torch.float64)


def _floor_histogram(x: torch.Tensor, bins: int = 64, low: float = -4.0, high: float = 4.0
                     ) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    d = rows.shape[1]
    idx = ((rows - low) * (bins / (high - low))).floor_().clamp_(-1, bins).long() + 1
    idx += torch.arange(d) * (bins + 2)
    return torch.bincount(idx.reshape(-1), minlength=d * (bins + 2))


def cases(seed: int) -> dict[str, Callable[[], object]]:
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(8, 128, 1024, generator=gen)  # mlp.post of the workloads' model
    narrow = torch.randn(8, 128, 256, generator=gen)  # resid_post
    mask = torch.ones(8, 128, dtype=torch.bool)
    ids = torch.arange(8)

    def step(make: Callable[[], cloche.Reducer], x: torch.Tensor) -> Callable[[], object]:
        saved = make()  # what earlier runs left (other values: ties are rare in real data)
        saved.update(torch.randn(x.shape, generator=gen), example_ids=ids + 100, mask=mask)

        def run() -> object:
            staged = make()
            staged.update(x, example_ids=ids, mask=mask)
            return saved.empty_like().merge(saved).merge(staged)
        return run

    return {
        "Mean update + merge": step(cloche.Mean, wide),
        "TopK(8) update + merge": step(lambda: cloche.TopK(8), wide),
        "torch topk over tokens (floor)": lambda: _floor_topk(wide),
        "Histogram(64) update + merge": step(lambda: cloche.Histogram(64, -4.0, 4.0), wide),
        "torch bincount (floor)": lambda: _floor_histogram(wide),
        "Covariance update + merge (d=256)": step(cloche.Covariance, narrow),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=5, help="calls per round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = cases(args.seed)
    times: dict[str, list[float]] = {name: [] for name in work}
    for fn in work.values():
        fn()  # warm-up
    for _ in range(args.rounds):  # interleaved, so that load from other jobs hits every case
        for name, fn in work.items():
            start = time.process_time()
            for _ in range(args.calls):
                fn()
            times[name].append((time.process_time() - start) / args.calls * 1e3)
    print(f"cloche from {cloche.__file__}; 1 torch thread; {args.rounds} rounds of {args.calls}"
          " calls; CPU ms per call")
    print("| step | min | median |")
    print("| --- | ---: | ---: |")
    for name, values in times.items():
        print(f"| {name} | {min(values):.2f} | {statistics.median(values):.2f} |")


if __name__ == "__main__":
    main()
