"""Timing helpers shared by the benchmarks: interleaved rounds, medians, ratio tables.

Benchmarks here run on shared machines (another job may be training on the same cores), so one
long run per case would mostly measure whatever else the machine was doing at the time. Instead
every case is timed once per *round*, in a freshly shuffled order, and a case's number is the
median over rounds. The ratio to the baseline is reported twice: the ratio of the two medians,
and the median of the per-round ratios (each round's case time over the same round's baseline
time), which cancels slow drifts in background load.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import resource
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
    #: the CPU clock for this case (default: this process's); a case whose work also runs in
    #: other processes (a sharded model's workers) passes one that adds theirs
    cpu: Callable[[], float] | None = None


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Timing:
    """The per-round times (seconds) of one case: wall clock and this process's CPU time.

    With one torch thread all the work runs on the calling thread, so CPU time counts the work
    itself and barely moves when another job competes for the cores; wall time is what a user
    waits, contention included.
    """

    case: Case
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)

    def median(self, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock))

    def quantile(self, q: float, clock: str = "wall") -> float:
        return _quantile(getattr(self, clock), q)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The GPT-2-architecture model and batch that the probing benchmarks share (4×256, vocab
    4096, batch 8×128 by default), so their figures are of the same model."""
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)


def fix_threads(n: int) -> int:
    """Pin torch's intra-op (and inter-op, when still allowed) thread counts; return ``n``."""
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(n)
    except RuntimeError:  # only settable before the first parallel op; keep the default then
        pass
    return torch.get_num_threads()


def minor_faults() -> int:
    """Minor page faults of this process so far: fresh memory the kernel had to map and zero."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


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
            faults = minor_faults()
            clock = case.cpu or time.process_time
            start, start_cpu = time.perf_counter(), clock()
            case.fn()
            wall, cpu = time.perf_counter() - start, clock() - start_cpu
            timing = timings[case.name]
            timing.wall.append(wall)
            timing.cpu.append(cpu)
            timing.faults.append(minor_faults() - faults)
        if progress is not None:
            progress(f"round {r + 1}/{rounds} done")
    return [timings[case.name] for case in cases]


def paired_ratio(timing: Timing, baseline: Timing, clock: str = "wall") -> float:
    """Median over rounds of (this case's time / the baseline's time in the same round)."""
    pairs = zip(getattr(timing, clock), getattr(baseline, clock), strict=True)
    return statistics.median(t / b for t, b in pairs)


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def markdown_table(timings: list[Timing], baseline: Timing, skipped: dict[str, str] | None = None
                   ) -> str:
    """A Markdown table of absolute medians and ratios to ``baseline``, on both clocks.

    "× (CPU)" is the ratio of CPU-time medians, the steadiest number on a busy machine;
    "× (wall, paired)" is the median of per-round wall-time ratios.
    """
    lines = [
        ("| case | wall median ms (p25–p75) | CPU median ms (p25–p75) | × plain HF (CPU) |"
         " × plain HF (wall, paired) | page faults / call | note |"),
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    lines.extend(
        f"| {t.case.name} | {t.median() * 1e3:.1f} ({t.quantile(0.25) * 1e3:.1f}–"
        f"{t.quantile(0.75) * 1e3:.1f}) | {t.median('cpu') * 1e3:.1f}"
        f" ({t.quantile(0.25, 'cpu') * 1e3:.1f}–{t.quantile(0.75, 'cpu') * 1e3:.1f}) |"
        f" {t.median('cpu') / baseline.median('cpu'):.3f} |"
        f" {paired_ratio(t, baseline):.3f} | {statistics.median(t.faults):.0f} |"
        f" {t.case.note} |"
        for t in timings
    )
    for name, why in (skipped or {}).items():
        lines.append(f"| {name} | — | — | — | — | — | not run: {why} |")
    return "\n".join(lines)


def add_profile_arguments(parser: argparse.ArgumentParser, calls: int) -> None:
    """``--profile CASE`` and ``--profile-calls N``: see :func:`profile_named`."""
    parser.add_argument("--profile", metavar="CASE", help="cProfile this case instead of timing")
    parser.add_argument("--profile-calls", type=int, default=calls)


def profile_named(cases: list[Case], name: str, calls: int) -> int:
    """Print a cProfile of ``calls`` calls of the case ``name`` (after two warm-up calls),
    sorted by own time; the exit status (2 when there is no such case)."""
    chosen = [c for c in cases if c.name == name]
    if not chosen:
        print(f"no case {name!r}; cases: {[c.name for c in cases]}")
        return 2
    case = chosen[0]
    for _ in range(2):
        case.fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        case.fn()
    profiler.disable()
    out = io.StringIO()
    out.write(f"cProfile of {case.name!r}, {calls} calls, sorted by own time\n")
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(30)
    print(out.getvalue())
    return 0
