"""Start a sharded model on this machine: rank 0 in this process, the others as subprocesses.

The CLI calls :func:`serve_distributed` for ``cloche serve --world-size N``; tests and notebooks
call :func:`start_local` for a :class:`cloche.Model` over a sharded executor that they drive
directly.
Each worker process runs ``python -m cloche.sharding.worker`` — the same entry point ``torchrun``
runs across machines — with the rank and rendezvous in its environment.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloche.api.model import Model
from cloche.errors import UsageError, WorkerLost
from cloche.model.hub import resolve_model
from cloche.sharding.layout import DistConfig
from cloche.sharding.worker import CONTROL_KEY_ENV, EXIT_WORKER_LOST, join

if TYPE_CHECKING:
    from cloche.sharding.executor import ShardedExecutor

__all__ = ["LocalGroup", "serve_distributed", "start_local"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class LocalGroup:
    """The worker processes of a group started on this machine."""

    def __init__(self, processes: dict[int, subprocess.Popen]) -> None:
        self.processes = processes

    def dead(self) -> dict[int, int | None]:
        """Ranks whose process has exited, with exit codes (rank 0's liveness check)."""
        return {r: p.returncode for r, p in self.processes.items() if p.poll() is not None}

    def kill(self, rank: int) -> None:
        self.processes[rank].kill()

    def terminate(self, grace_s: float = 5.0) -> None:
        for p in self.processes.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace_s
        for p in self.processes.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def wait(self, timeout_s: float) -> dict[int, int | None]:
        deadline = time.monotonic() + timeout_s
        for p in self.processes.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return {r: p.poll() for r, p in self.processes.items()}


def _spawn_workers(model_dir: str, world_size: int, port: int, options: list[str],
                   master_addr: str, device: str | None, key: bytes) -> LocalGroup:
    root = str(Path(__file__).resolve().parents[2])
    paths = [root, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    processes = {}
    for rank in range(1, world_size):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                   MASTER_ADDR=master_addr, MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)),
                   **{CONTROL_KEY_ENV: key.hex()})
        cmd = [sys.executable, "-m", "cloche.sharding.worker", "--model", model_dir,
               "--store-port-offset", "0", *options]
        if device is not None:
            cmd += ["--device", device]
        processes[rank] = subprocess.Popen(cmd, env=env)
    return LocalGroup(processes)


def _options(layers_per_rank: Sequence[int] | None, backend: str | None, dtype: str | None,
             timeout_s: float, micro_batches: int, threads: int | None,
             state_dir: str | None, direct_links: bool = True) -> list[str]:
    opts = ["--timeout", str(timeout_s), "--micro-batches", str(micro_batches)]
    if not direct_links:
        opts += ["--no-direct-links"]
    if state_dir is not None:
        opts += ["--state-dir", state_dir]
    if layers_per_rank is not None:
        opts += ["--layers-per-rank", ",".join(str(int(n)) for n in layers_per_rank)]
    if backend is not None:
        opts += ["--backend", backend]
    if dtype is not None:
        opts += ["--dtype", str(dtype).removeprefix("torch.")]
    if threads is not None:
        opts += ["--threads", str(threads)]
    return opts


def start_local(model_dir: str | os.PathLike[str], world_size: int, *,
                revision: str | None = None,
                layers_per_rank: Sequence[int] | None = None, backend: str | None = None,
                device: str | None = None, dtype: str | None = None, timeout_s: float = 60.0,
                micro_batches: int = 1, threads: int | None = None,
                master_addr: str = "127.0.0.1", port: int | None = None,
                on_lost: Callable[[WorkerLost], None] | None = None,
                state_dir: str | os.PathLike[str] | None = None,
                direct_links: bool = True) -> Model:
    """A :class:`cloche.Model` sharded over ``world_size`` ranks of this machine (rank 0 here).

    ``model_dir`` is a directory or a hub name (at ``revision``), resolved here once through the
    Hugging Face cache: every rank gets the local snapshot path and downloads nothing.
    ``model.executor.group`` holds the worker processes; ``model.close()`` shuts them down.
    ``state_dir`` keeps every rank's committed save contexts on disk (``rank-{r}`` inside it).
    ``direct_links=False``: CPU ranks talk through the control store and gloo, as CUDA groups do
    (``sharding.p2p``), instead of direct connections (``sharding.links``).
    """
    executor, _ = _start_group(model_dir, world_size, revision=revision,
                               layers_per_rank=layers_per_rank,
                               backend=backend, device=device, dtype=dtype, timeout_s=timeout_s,
                               micro_batches=micro_batches, threads=threads,
                               master_addr=master_addr, port=port, on_lost=on_lost,
                               state_dir=state_dir, direct_links=direct_links)
    return Model(executor)


def _start_group(model_dir: str | os.PathLike[str], world_size: int, *,
                 revision: str | None = None,
                 layers_per_rank: Sequence[int] | None, backend: str | None,
                 device: str | None, dtype: str | None, timeout_s: float, micro_batches: int,
                 threads: int | None, master_addr: str, port: int | None,
                 on_lost: Callable[[WorkerLost], None] | None,
                 state_dir: str | os.PathLike[str] | None = None, direct_links: bool = True
                 ) -> tuple[ShardedExecutor, LocalGroup]:
    """Rank 0's executor (joined to the group) and the worker processes it drives."""
    from cloche.sharding.executor import ShardedExecutor

    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 2:
        raise UsageError(f"world_size ({world_size!r}) must be an int >= 2")
    # resolved once, here: the ranks get a local directory and never download anything
    model_dir = str(resolve_model(model_dir, revision=revision).path)
    port = port or _free_port(master_addr)
    key = secrets.token_bytes(32)  # this group's control key: the workers get it, nobody else
    state = None if state_dir is None else str(Path(state_dir).expanduser().resolve())
    options = _options(layers_per_rank, backend, dtype, timeout_s, micro_batches, threads, state,
                       direct_links)
    group = _spawn_workers(model_dir, world_size, port, options, master_addr,
                           "cuda" if device and device.startswith("cuda") else device, key)
    config = DistConfig(model_dir=model_dir, rank=0, world_size=world_size,
                        master_addr=master_addr, master_port=port, store_is_master=True,
                        backend=backend, device=device, dtype=dtype,
                        layers_per_rank=tuple(layers_per_rank) if layers_per_rank else None,
                        timeout_s=timeout_s, micro_batches=micro_batches, threads=threads,
                        control_key=key, state_dir=state, direct_links=direct_links)
    try:
        rank = join(config, local_check=group.dead)
    except BaseException:
        group.terminate()
        raise
    try:
        executor = ShardedExecutor(rank, on_lost=on_lost, micro_batches=micro_batches)
    except BaseException:  # (reconciling a state directory failed, say): leave nothing behind
        group.terminate()
        rank.close()
        raise
    executor.group = group

    def reap() -> None:
        codes = group.wait(timeout_s=10)
        if any(code is None for code in codes.values()):
            group.terminate()

    executor.add_close_callback(reap)
    return executor, group


def serve_distributed(model_dir: str | os.PathLike[str], world_size: int,
                      serve_fn: Callable[[Any], Any], *, revision: str | None = None,
                      layers_per_rank: Sequence[int] | None = None, backend: str | None = None,
                      device: str | None = None, dtype: str | None = None,
                      timeout_s: float = 60.0, micro_batches: int = 1,
                      threads: int | None = None, master_addr: str = "127.0.0.1",
                      port: int | None = None,
                      state_dir: str | os.PathLike[str] | None = None) -> int:
    """``cloche serve --world-size N``: start N ranks here and call ``serve_fn(model)`` on rank 0.

    Returns 0 when ``serve_fn`` returns (the workers are shut down). If a rank is lost, the
    request in flight fails with ``WorkerLost`` (the client sees it), a message naming the rank
    goes to stderr, the other workers are stopped and the process exits with code 3 — the
    group is not restarted; a supervisor (systemd, k8s, torchrun --max-restarts) may restart it.
    """
    group_box: list[LocalGroup] = []

    def on_lost(exc: WorkerLost) -> None:
        time.sleep(min(2.0, timeout_s))  # let the failing request reach its client first
        print(f"cloche serve: {exc}; shutting down (exit code {EXIT_WORKER_LOST})",
              file=sys.stderr, flush=True)
        if group_box:
            group_box[0].terminate(grace_s=2.0)
        os._exit(EXIT_WORKER_LOST)

    executor, group = _start_group(model_dir, world_size, revision=revision,
                                   layers_per_rank=layers_per_rank,
                                   backend=backend, device=device, dtype=dtype,
                                   timeout_s=timeout_s, micro_batches=micro_batches,
                                   threads=threads, master_addr=master_addr, port=port,
                                   on_lost=on_lost, state_dir=state_dir)
    group_box.append(group)
    model = Model(executor)
    try:
        serve_fn(model)
    finally:
        model.close()
    return 0
