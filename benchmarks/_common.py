"""Timing helpers shared by the benchmarks: interleaved rounds, medians, ratio tables.

Benchmarks here run on shared machines (another job may be training on the same cores), so one
long run per case would mostly measure whatever else the machine was doing at the time. Instead
every case is timed once per *round*, in a freshly shuffled order, and a case's number is the
median over rounds. The ratio to the baseline is reported twice: the ratio of the two medians,
and the median of the per-round ratios (each round's case time over the same round's baseline
time), which cancels slow drifts in background load.
"""

from __future__ import annotations

import gc
import os
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Case:
    """One thing to time: ``fn()`` does the whole piece of work once."""

    name: str
    fn: Callable[[], object]
    note: str = ""


@dataclass
class Timing:
    """The per-round wall times (seconds) of one case."""

    case: Case
    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        ordered = sorted(self.times)
        return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def fix_threads(n: int) -> int:
    """Pin torch's intra-op (and inter-op, when still allowed) thread counts; return ``n``."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; keep the default then
        pass
    return torch.get_num_threads()


def measure(cases: list[Case], *, rounds: int, warmup: int, seed: int = 0,
            progress: Callable[[str], None] | None = None) -> list[Timing]:
    """Warm every case up, then time ``rounds`` interleaved rounds in shuffled order."""
    for case in cases:
        for _ in range(warmup):
            case.fn()
    timings = {case.name: Timing(case) for case in cases}
    rng = random.Random(seed)
    for r in range(rounds):
        order = list(cases)
        rng.shuffle(order)
        for case in order:
            gc.collect()
            start = time.perf_counter()
            case.fn()
            timings[case.name].times.append(time.perf_counter() - start)
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done")
    return [timings[case.name] for case in cases]


def paired_ratio(timing: Timing, baseline: Timing) -> float:
    """Median over rounds of (this case's time / the baseline's time in the same round)."""
    return statistics.median(t / b for t, b in zip(timing.times, baseline.times))


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def markdown_table(timings: list[Timing], baseline: Timing, skipped: dict[str, str] | None = None
                   ) -> str:
    """A Markdown table: median, IQR, ratio of medians and paired ratio to ``baseline``."""
    lines = [
        "| case | median ms | p25–p75 ms | × plain HF (medians) | × plain HF (paired) | note |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for t in timings:
        ratio = t.median / baseline.median
        lines.append(
            f"| {t.case.name} | {t.median * 1e3:.1f} | {t.quantile(0.25) * 1e3:.1f}–"
            f"{t.quantile(0.75) * 1e3:.1f} | {ratio:.3f} | {paired_ratio(t, baseline):.3f} |"
            f" {t.case.note} |"
        )
    for name, why in (skipped or {}).items():
        lines.append(f"| {name} | — | — | — | — | not run: {why} |")
    return "\n".join(lines)
