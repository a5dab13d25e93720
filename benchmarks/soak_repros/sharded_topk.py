"""Found by benchmarks/soak.py: ``TopK`` in a plain ``run`` works at world size 1, not at 2.

A plain run numbers its rows per save context (``ctx.example_ids``, cloche/probes/context.py),
which ``TopK`` needs; on a sharded model the stages get ``example_ids=None`` in plain runs
(dataset runs pass them), so the same probe fails with ``UsageError: TopK(...).update needs
example_ids`` on whichever rank owns the point.

    PYTHONPATH=. python benchmarks/soak_repros/sharded_topk.py
"""
import torch

import cloche
from cloche.default_model import weights_dir
from cloche.sharding.launch import start_local


def top(ctx, x):
    ctx.reduce("top", x, cloche.TopK(5))


ids = torch.randint(3, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
local = cloche.load(weights_dir())
local.run(ids, probes={"layers.1.resid_post": top}, save="c")
print("world size 1:", tuple(local.save_context("c").result("top")["values"].shape))
sharded = start_local(weights_dir(), 2, threads=1)
try:
    for point in ("layers.0.resid_post", "layers.1.resid_post"):  # rank 0, rank 1
        try:
            sharded.run(ids, probes={point: top}, save="c")
            print("world size 2,", point, tuple(sharded.save_context("c").result("top")[
                "values"].shape))
        except cloche.UsageError as exc:
            print("world size 2,", point, "UsageError:", str(exc).splitlines()[0])
finally:
    sharded.close()
