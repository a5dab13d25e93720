"""Serve functions for ``serve_distributed`` run in a subprocess (see test_launch.py).

``python -m tests.sharding.launch_job DIR MODE``: MODE ``ok`` checks the model and returns (exit 0);
MODE ``lose`` kills rank 1 and keeps using the model, which must end the process with code 3.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch
from cloche.sharding.launch import serve_distributed

from tests.threads import TORCH_THREADS


def check_and_return(model) -> None:
    assert model.world_size == 2
    assert model.run(torch.tensor([[5, 6, 7, 8]])).logits.shape == (1, 4, model.d_vocab)
    print("served ok", flush=True)


def lose_a_rank(model) -> None:
    os.kill(model.executor.group.processes[1].pid, signal.SIGKILL)
    try:
        model.run(torch.tensor([[5, 6, 7, 8]]))
    except Exception as exc:  # noqa: BLE001 - the test reads what a client would see
        print(f"client saw {type(exc).__name__}: {exc}", flush=True)
    threading.Event().wait()  # parked: serve_distributed's handler ends the process (code 3)


if __name__ == "__main__":
    directory, mode = sys.argv[1], sys.argv[2]
    serve = check_and_return if mode == "ok" else lose_a_rank
    sys.exit(serve_distributed(directory, 2, serve, timeout_s=5.0, threads=TORCH_THREADS))
