"""Issue 13's targets, judged on the outputs of several ``workloads.py`` runs.

The issue counts a target as met when it holds on the median of 30 interleaved rounds in each
of 3 separate runs. This reads each run's printed table (the "× plain HF (CPU medians)" column,
the p25–p75 of the plain forward) and its remote fixed-cost lines, and prints one markdown row
per target with each run's figure and in how many runs it holds:

    for seed in 0 1 2; do
        python benchmarks/workloads.py --rounds 30 --dataset-batches 4 --seed $seed > run$seed.txt
    done
    python benchmarks/workload_verdicts.py run0.txt run1.txt run2.txt

Reductions: remote and sharded are compared with local through ``run_dataset`` (the path a
server or a sharded model runs); throughput is the inverse of the CPU-time ratio.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass

ROW = re.compile(r"^\| (?P<workload>[^|]+?) \| (?P<tool>[^|]+?) \| (?P<median>[\d.]+) "
                 r"\((?P<p25>[\d.]+)–(?P<p75>[\d.]+)\) \| (?P<ratio>[\d.]+) \| [\d.]+ \|$")
FIXED = re.compile(r"^- (?P<what>run|run \+ probe|ping): CPU local [\d.]+, remote [\d.]+ → "
                   r"\+?(?P<extra>-?[\d.]+) ms")
FORWARD = ["logit lens", "steer", "steer generate", "patch positions", "attribution",
           "capture-all"]
REDUCTIONS = ["reduce Mean", "reduce TopK", "reduce Histogram", "reduce Covariance"]
FLOOR = "plain HF + torch hook (floor)"


@dataclass
class Run:
    """One run's rows: (workload, tool) -> (CPU median, p25, p75, ratio), and fixed costs."""

    rows: dict[tuple[str, str], tuple[float, float, float, float]]
    fixed: dict[str, float]

    def ratio(self, workload: str, tool: str) -> float | None:
        row = self.rows.get((workload, tool))
        return None if row is None else row[3]


def parse(path: str) -> Run:
    rows, fixed = {}, {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if (m := ROW.match(line.rstrip("\n"))) is not None:
                rows[(m["workload"], m["tool"])] = (float(m["median"]), float(m["p25"]),
                                                    float(m["p75"]), float(m["ratio"]))
            elif (m := FIXED.match(line)) is not None:
                fixed[m["what"]] = float(m["extra"])
    return Run(rows, fixed)


def _best_peer(run: Run, workload: str) -> float | None:
    ratios = [run.ratio(workload, peer) for peer in ("NNsight", "TransformerLens")]
    return min((v for v in ratios if v is not None), default=None)


def _extra_percent(run: Run, workload: str, kind: str) -> float | None:
    """How much more ``kind`` (remote, sharded ws2) costs than local, in percent."""
    suffix = " run_dataset" if workload.startswith("reduce") else ""
    mine, theirs = run.ratio(workload, f"cloche local{suffix}"), run.ratio(workload,
                                                                           f"cloche {kind}{suffix}")
    return None if mine is None or theirs is None else (theirs / mine - 1) * 100


def _throughput(run: Run, workload: str, tool: str) -> float | None:
    ratio = run.ratio(workload, tool)
    return None if ratio is None else 1 / ratio


def _over_floor(run: Run, workload: str, tool: str) -> float | None:
    """The floor's CPU time over ``tool``'s: ≥ 1 when ``tool`` is at least as fast."""
    mine, floor = run.ratio(workload, tool), run.ratio(workload, FLOOR)
    return None if mine is None or floor is None else floor / mine


def _shown(values: Sequence[float | None], fmt: str = "{:.3f}") -> str:
    return " / ".join("—" if v is None else fmt.format(v) for v in values)


def _met(holds: Sequence[bool]) -> str:
    return f"{sum(holds)} of {len(holds)}"


def verdicts(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """(target, each run's figures, in how many runs it holds)."""
    out = []
    for workload in [*FORWARD, "reduce Mean"]:
        tool = "cloche local run" if workload.startswith("reduce") else "cloche local"
        mine = [r.ratio(workload, tool) for r in runs]
        peers = [_best_peer(r, workload) for r in runs]
        holds = [a is not None and b is not None and a <= b
                 for a, b in zip(mine, peers, strict=True)]
        out.append((f"local ≤ best peer: {workload}", f"{_shown(mine)} vs {_shown(peers)}",
                    _met(holds)))
    for kind in ("remote", "sharded ws2"):
        for workload in FORWARD + REDUCTIONS:
            values = [_extra_percent(r, workload, kind) for r in runs]
            out.append((f"{kind} within 5 % of local: {workload}", _shown(values, "{:+.1f} %"),
                        _met([v is not None and v <= 5 for v in values])))
    figures, holds = [], []
    for run in runs:
        plain = run.rows.get(("capture-all", "plain HF"))
        ours = run.ratio("capture-all", "cloche local")
        nnsight = run.ratio("capture-all", "NNsight")
        if plain is None or ours is None or nnsight is None:
            continue
        spread = (plain[2] - plain[1]) / plain[0]
        figures.append(f"{ours:.3f} vs {nnsight:.3f} (spread {spread * 100:.1f} %)")
        holds.append(nnsight - ours > spread)
    out.append(("capture-all below NNsight by more than plain HF's p25–p75 spread",
                "; ".join(figures), _met(holds)))
    for workload in REDUCTIONS[:3]:
        for tool, target in (("cloche local run", 0.98), ("cloche local run_dataset", 0.98),
                             ("cloche local run, return_logits=False", 1.0)):
            speed = [_throughput(r, workload, tool) for r in runs]
            floor = [_throughput(r, workload, FLOOR) for r in runs]
            name = f"{workload} · {tool.removeprefix('cloche local ')}"
            out.append((f"{name} ≥ {target}× the plain forward's throughput",
                        f"{_shown(speed)} (floor {_shown(floor)})",
                        _met([v is not None and v >= target for v in speed])))
    cov = [_over_floor(r, "reduce Covariance", "cloche local run") for r in runs]
    out.append(("Covariance ≥ 0.95× of its floor (`run`)", _shown(cov),
                _met([v is not None and v >= 0.95 for v in cov])))
    for what in ("run", "run + probe", "ping"):
        extra_ms = [r.fixed.get(what) for r in runs]
        out.append((f"remote fixed cost ≤ 1 ms: `{what}`", _shown(extra_ms, "+{:.2f} ms"),
                    _met([v is not None and v <= 1 for v in extra_ms])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", help="the printed output of each workloads.py run")
    args = parser.parse_args()
    runs = [parse(path) for path in args.outputs]
    print("| target | each run | met in |")
    print("| --- | --- | --- |")
    for target, figures, met in verdicts(runs):
        print(f"| {target} | {figures} | {met} |")


if __name__ == "__main__":
    main()
