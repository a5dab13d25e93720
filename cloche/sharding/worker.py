"""One rank's process: join the group, load the shard, then serve (rank 0) or obey (ranks > 0).

``python -m cloche.sharding.worker --model DIR`` is the entry point under ``torchrun``: it reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from torchrun's
environment (here, at the entry point, and nowhere else). Rank 0 builds a
:class:`~cloche.sharding.model.DistributedModel` and hands it to the serve function (``--serve
module:function``; by default the cloche server), ranks > 0 run :func:`command_loop` until rank 0
says shut down. ``cloche.sharding.launch`` starts the same function in local processes.

Exit codes: 0 after a clean shutdown; 3 when a rank was lost (the message names it).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch

from cloche.sharding.channel_keys import keys
from cloche.sharding.control import Aborted, Control
from cloche.sharding.layout import DistConfig, Layout
from cloche.sharding.p2p import Channel
from cloche.sharding.shard import make_plan, skeleton
from cloche.sharding.stage import Stage, error_envelope
from cloche.errors import UsageError, WorkerLost

__all__ = ["EXIT_WORKER_LOST", "Rank", "command_loop", "join", "main"]

EXIT_WORKER_LOST = 3
TRANSACTIONAL = ("run", "generate", "dataset")


@dataclass
class Rank:
    """Everything one rank holds: its layout, control plane, channel and stage."""

    config: DistConfig
    layout: Layout
    control: Control
    channel: Channel
    stage: Stage

    def close(self) -> None:
        self.control.close()
        self.layout.close()


def join(config: DistConfig,
         local_check: Callable[[], dict[int, int | None]] | None = None) -> Rank:
    """Join the group described by ``config`` and load this rank's shard."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    layout = Layout(config)
    control = Control(layout.store, layout.new_store_client(), layout.rank, layout.world_size,
                      config.timeout_s, config.heartbeat_s, local_check)
    channel = Channel(control, layout.rank, layout.device, layout.tensor_group,
                      layout.object_group)
    sk = skeleton(config.model_dir, config.dtype)
    plan = make_plan(sk, layout.world_size, config.layers_per_rank)
    stage = Stage(sk, plan, layout.rank, layout.device, control, channel)
    return Rank(config, layout, control, channel, stage)


def _lost_exit(rank: int) -> Callable[[WorkerLost], None]:
    def on_lost(exc: WorkerLost) -> None:
        print(f"cloche rank {rank}: {exc}; exiting (code {EXIT_WORKER_LOST})", file=sys.stderr,
              flush=True)
        os._exit(EXIT_WORKER_LOST)
    return on_lost


def command_loop(rank: Rank) -> int:
    """Ranks > 0: execute rank 0's commands until it says shut down (returns the exit code)."""
    import pickle

    control, stage, channel = rank.control, rank.stage, rank.channel
    control.on_lost = _lost_exit(rank.layout.rank)
    control.watch_idle = True
    light = LightService(rank)
    light.start()
    seq = 1
    shutting_down = False
    while True:
        try:
            raw = control.wait(f"cmd/{seq}", abortable=False)
            cmd = cloudpickle.loads(raw)
            if cmd.op == "shutdown":
                # Rank 0 may exit, and the control store it hosts with it, as soon as it has
                # this rank's answer: stop the heartbeat poller now, and read a store that
                # vanishes from here on (WorkerLost, or a store call's RuntimeError) as the end
                # we were told to reach, not a lost rank 0.
                shutting_down = True
                control.close()
            control.begin(seq)
            envelope = stage.execute(cmd)
            try:
                channel.send_object(0, keys.result(seq, rank.layout.rank), envelope)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:
                failure = UsageError(f"the result of {cmd.op} cannot be sent to rank 0: {exc}")
                channel.send_object(0, keys.result(seq, rank.layout.rank),
                                    error_envelope(failure, aborted=False))
            channel.flush()
            control.end()
            if cmd.op in TRANSACTIONAL:  # rank 0 decides once it heard from every rank
                verdict = control.wait(f"decide/{seq}", abortable=False)
                stage.settle(seq, verdict == b"1")
                control.store.add(f"settled/{seq}", 1)  # reads after this see the outcome
        except WorkerLost as exc:
            if not shutting_down:
                _lost_exit(rank.layout.rank)(exc)
        except RuntimeError:
            if not shutting_down:
                raise
        if shutting_down:
            light.stop()
            return 0
        seq += 1


class LightService(threading.Thread):
    """Answers rank 0's read-only requests (fetch, keys, state, reducers, param) at once.

    The server promises that reading saved data is never stuck behind a long run; on a worker
    the main thread may be busy with a dataset run, so a second thread, with its own store
    connection and message keys, serves reads of committed data meanwhile.
    """

    def __init__(self, rank: Rank) -> None:
        super().__init__(name=f"cloche-light-{rank.layout.rank}", daemon=True)
        layout = rank.layout
        self.rank = layout.rank
        self.stage = rank.stage
        self.control = Control(layout.new_store_client(), None, layout.rank, layout.world_size,
                               rank.config.timeout_s, rank.config.heartbeat_s)
        self.channel = Channel(self.control, layout.rank, layout.device, layout.tensor_group,
                               layout.object_group, announce=False)

    def run(self) -> None:
        n = 1
        while True:
            try:
                key = f"light/{self.rank}/{n}"
                raw = self.control.wait(key, abortable=False)
                self.control.store.delete_key(key)
                op, kwargs = cloudpickle.loads(raw)
                try:
                    reply = {"ok": True, "value": self.stage.light(op, kwargs)}
                except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
                    reply = error_envelope(exc, aborted=False)
                self.channel.send_object(0, keys.light(self.rank, n), reply)
                self.channel.flush()
            except (WorkerLost, Aborted):
                return  # lost: the main thread reports it and exits; Aborted: shutting down
            n += 1

    def stop(self) -> None:
        self.control.closing.set()
        self.join(timeout=5)


def _import(spec: str) -> Callable[[Any], Any]:
    module, _, attr = spec.partition(":")
    if not attr:
        raise UsageError(f"--serve takes module:function, not {spec!r}")
    return getattr(importlib.import_module(module), attr)


def default_serve(model: Any) -> None:
    """Serve ``model`` with the cloche server (token from CLOCHE_TOKEN, read at the entry)."""
    import secrets

    from cloche.server.app import Server
    from cloche.server.config import ServerConfig

    options = getattr(model, "serve_options", {})
    token = options.get("token") or secrets.token_urlsafe(24)
    if not options.get("token"):
        print(f"cloche: token {token}", flush=True)
    server = Server(model, ServerConfig(token=token,
                                        host=options.get("host", "127.0.0.1"),
                                        port=int(options.get("port", 0))))
    host, port = server.start()
    print(f"cloche: serving {model.name} sharded over {model.world_size} ranks at"
          f" {host}:{port}", flush=True)
    server.wait()


def run_rank(config: DistConfig, serve: Callable[[Any], Any],
             local_check: Callable[[], dict[int, int | None]] | None = None,
             serve_options: dict | None = None) -> int:
    """Join, then serve (rank 0) or obey (others). Returns the process exit code."""
    from cloche.sharding.model import DistributedModel

    try:
        rank = join(config, local_check)
    except WorkerLost as exc:
        print(f"cloche rank {config.rank}: {exc}", file=sys.stderr, flush=True)
        return EXIT_WORKER_LOST
    if config.rank != 0:
        return command_loop(rank)
    model = DistributedModel(rank, on_lost=_lost_exit(0), micro_batches=config.micro_batches)
    model.serve_options = dict(serve_options or {})
    try:
        serve(model)
    finally:
        model.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cloche.sharding.worker",
                                     description="one rank of a sharded cloche server")
    parser.add_argument("--model", required=True, help="model directory (safetensors)")
    parser.add_argument("--layers-per-rank", default=None,
                        help="comma-separated block counts, e.g. 6,6,4")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: by backend)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--timeout", type=float, default=60.0, help="fault bound in seconds")
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--store-port-offset", type=int, default=1,
                        help="cloche's control store listens on MASTER_PORT + this")
    parser.add_argument("--serve", default=None, help="module:function called with the model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    return parser.parse_args(argv)


def config_from_env(args: argparse.Namespace, env: dict[str, str]) -> DistConfig:
    """The entry point's one look at the environment torchrun (or the launcher) prepared."""
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except KeyError as exc:
        raise UsageError(f"{exc.args[0]} is not set: run under torchrun, or use"
                         " cloche.sharding.launch.serve_distributed") from exc
    layers = tuple(int(x) for x in args.layers_per_rank.split(",")) \
        if args.layers_per_rank else None
    device = args.device
    if device == "cuda":
        device = f"cuda:{int(env.get('LOCAL_RANK', '0'))}"
    return DistConfig(model_dir=args.model, rank=rank, world_size=world, master_addr=addr,
                      master_port=port + args.store_port_offset, store_is_master=rank == 0,
                      store_prefix="cloche" + (f"/{env['TORCHELASTIC_RESTART_COUNT']}"
                                               if "TORCHELASTIC_RESTART_COUNT" in env else ""),
                      backend=args.backend, device=device,
                      local_rank=int(env.get("LOCAL_RANK", "0")), dtype=args.dtype,
                      layers_per_rank=layers, timeout_s=args.timeout,
                      micro_batches=args.micro_batches, threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_env(args, dict(os.environ))
    serve = _import(args.serve) if args.serve else default_serve
    options = {"host": args.host, "port": args.port, "token": os.environ.get("CLOCHE_TOKEN", "")}
    return run_rank(config, serve, serve_options=options)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: C++ threads of the process group may still run
