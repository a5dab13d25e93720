"""Each rank's resident memory grows by its shard, not by the whole model (blocks of >= 50 MB).

    python benchmarks/shard_memory.py [--layers 8] [--d-model 1024] [--world-size 4]

A GPT-2 architecture with ``--layers`` blocks of d_model 1024 (12.6 M parameters, 50.4 MB in
float32 per block) is built from a config with random weights and saved to a temporary
directory. Two measurements:

1. **One shard per process, as a rank loads it.** For every rank r (and for the whole model
   through ``cloche.load``), a fresh ``python`` process imports everything, resets its peak
   (``/proc/self/clear_refs``), records its resident memory, builds rank r's shard with
   ``cloche.sharding.shard.build_shard`` (the very function every rank calls), touches every
   weight and reports the growth of VmRSS and the peak (VmHWM) during loading.
2. **A live group.** ``start_local(dir, world_size)`` starts the ranks as a sharded serve
   does; ``model.call(fn, rank="all")`` reads each rank's VmRSS, VmHWM and the bytes of the
   parameters it holds; beside it, the resident memory of a process that imported the same
   modules and loaded nothing (the floor every rank starts from).

Both print the planned shard bytes of ``cloche plan`` (``plan_capacity``) beside the growth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]

MEASURE = r"""
import json, sys
import torch
torch.set_num_threads(1)
import cloche
from cloche.sharding.shard import build_shard, make_plan, skeleton
import transformers.models.gpt2.modeling_gpt2

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
directory, mode, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
before = status("VmRSS")
if mode == "none":
    model = None
elif mode == "whole":
    model = cloche.load(directory).hf_model
else:
    sk = skeleton(directory)
    model = build_shard(sk, make_plan(sk, world), int(mode), stage=None).hf_model
peak = status("VmHWM")
held = 0
if model is not None:
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
            held += p.numel() * p.element_size()
print(json.dumps({"before": before, "peak": peak, "after": status("VmRSS"), "held": held}))
"""


def _rank_stats(shard) -> dict[str, int]:
    """VmRSS, VmHWM and parameter bytes of this rank's process (run on every rank)."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024
    fields["held"] = sum(p.numel() * p.element_size() for p in shard.hf_model.parameters())
    return fields


def _measure(directory: str, mode: str, world: int) -> dict[str, int]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                   "")]))
    out = subprocess.run([sys.executable, "-c", MEASURE, directory, mode, str(world)],
                         check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d-model", type=int, default=1024)
    parser.add_argument("--world-size", type=int, default=4)
    args = parser.parse_args()

    from cloche.sharding.capacity import plan_capacity
    from cloche.sharding.launch import start_local
    from cloche.sharding.shard import plan_weights, skeleton_from_config

    config = transformers.GPT2Config(n_layer=args.layers, n_embd=args.d_model,
                                     n_head=args.d_model // 64, n_positions=128, vocab_size=8000,
                                     bos_token_id=0, eos_token_id=1)
    with tempfile.TemporaryDirectory() as directory:
        torch.manual_seed(0)
        transformers.GPT2LMHeadModel(config).save_pretrained(directory)
        plan = plan_capacity(directory, args.world_size)
        blocks, _, _ = plan_weights(skeleton_from_config(config))
        block = 4 * blocks[0]  # float32
        print(f"GPT-2 architecture, {args.layers} blocks of d_model {args.d_model}"
              f" ({block / 1e6:.1f} MB per block in float32), vocab 8000 (tied):"
              f" {plan.total_parameters / 1e6:.1f} M parameters,"
              f" {plan.total_weight_bytes / 1e6:.0f} MB; world size {args.world_size}, plan"
              f" {[r.layers for r in plan.ranks]}", flush=True)

        print("\n1. one process per shard (build_shard), growth of resident memory (MB)")
        print("| loaded | blocks | planned weights | held after load | RSS growth |"
              " peak growth while loading | RSS growth / planned |")
        print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
        rows = [("whole model (cloche.load)", "whole", f"0-{args.layers - 1}",
                 plan.total_weight_bytes)]
        rows += [(f"rank {r.rank} of {args.world_size}", str(r.rank),
                  f"{r.layers[0]}-{r.layers[1]}", r.weight_bytes) for r in plan.ranks]
        for label, mode, blocks, planned in rows:
            got = _measure(directory, mode, args.world_size)
            growth, peak = got["after"] - got["before"], got["peak"] - got["before"]
            print(f"| {label} | {blocks} | {mb(planned)} | {mb(got['held'])} | {mb(growth)} |"
                  f" {mb(peak)} | {growth / planned:.2f} |", flush=True)

        floor = _measure(directory, "none", args.world_size)["after"]
        print(f"\n2. a live group of {args.world_size} ranks (start_local); a process that"
              f" imported the same modules and loaded nothing: {mb(floor)} MB resident")
        print("| rank | blocks | planned weights | held | VmRSS | VmRSS - floor | VmHWM - floor |")
        print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
        model = start_local(directory, args.world_size, threads=1, timeout_s=120)
        try:
            stats = model.call(_rank_stats, rank="all")
        finally:
            model.close()
        for r in plan.ranks:
            s = stats[r.rank]
            print(f"| {r.rank} | {r.layers[0]}-{r.layers[1]} | {mb(r.weight_bytes)} |"
                  f" {mb(s['held'])} | {mb(s['VmRSS'])} | {mb(s['VmRSS'] - floor)} |"
                  f" {mb(s['VmHWM'] - floor)} |")


if __name__ == "__main__":
    main()
