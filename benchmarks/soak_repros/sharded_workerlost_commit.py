"""Found by benchmarks/soak.py: a sharded run that failed with ``WorkerLost`` is committed on
rank 0 only.

``ShardedExecutor._command`` (cloche/sharding/executor.py) commits rank 0's part
(``self._stage.settle(seq, ok)``) before it publishes ``decide/{seq}`` and waits for the other
ranks to apply it. If rank 1 dies in between, the client gets ``WorkerLost``, rank 0 has
journaled the run and rank 1 has not: after a restart with the same ``--state-dir`` the ranks
disagree (num_runs 2 on rank 0, 1 on rank 1; rank 0's key has 2 entries, rank 1's 1), although
docs/distributed.md says a run that fails on any rank leaves every rank's contexts as they were.
The monkeypatch below only kills rank 1 at that moment every time; ``kill -9`` at a random
moment hits it by chance (in the soak a dataset run that failed with ``WorkerLost`` was there
after the restart).

    PYTHONPATH=. python benchmarks/soak_repros/sharded_workerlost_commit.py

Fixed: rank 0 now commits last, after every worker applied the decision, and records the
transaction as whole; a rank lost in between rolls rank 0 back, and a restart on the same state
directory takes back what the workers committed (``ShardedExecutor.reconcile``). The script
kills rank 1 at the same moment of the new order (after its vote, before the decision) and
prints ``WorkerLost`` then one run on every rank. Regression tests:
tests/sharding/test_state_dir.py.
"""
import tempfile

import torch

import cloche
from cloche.default_model import weights_dir
from cloche.sharding.launch import start_local


def tag(ctx, x):
    ctx.save(f"x{ctx.layer}", x[:, -1])


POINTS = {"layers.0.resid_post": tag, "layers.1.resid_post": tag}  # one on each rank
ids = torch.randint(3, 4096, (1, 8), generator=torch.Generator().manual_seed(0))


def per_rank(shard, name):
    h = shard.save_context(name)
    return h.num_runs, {k: len(h.fetch(k, "list")) for k in sorted(h.keys())}


state = tempfile.mkdtemp()
model = start_local(weights_dir(), 2, state_dir=state, threads=1, timeout_s=20)
model.run(ids, probes=POINTS, save="c")  # one committed run
executor = model.executor
if hasattr(executor, "_settle"):  # rank 0 publishes the decision, then commits last
    original = executor._settle

    def settle(*args):  # rank 1 has voted; it dies before it reads the decision
        executor.group.processes[1].kill()
        executor.group.processes[1].wait()
        return original(*args)

    executor._settle = settle
else:  # the order the soak found: rank 0 committed first
    original = executor._stage.settle

    def settle(*args):
        executor.group.processes[1].kill()
        executor.group.processes[1].wait()
        return original(*args)

    executor._stage.settle = settle
try:
    model.run(ids, probes=POINTS, save="c")
    print("second run: returned")
except cloche.WorkerLost as exc:
    print("second run: WorkerLost:", str(exc).splitlines()[0])
model.close()
again = start_local(weights_dir(), 2, state_dir=state, threads=1)
try:
    handle = again.save_context("c")
    print("after a restart: num_runs", handle.num_runs, "| entries",
          {k: len(handle.fetch(k, "list")) for k in sorted(handle.keys())},
          "| per rank (num_runs, entries):", again.call(per_rank, "c", rank="all"))
finally:
    again.close()
