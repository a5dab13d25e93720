"""One rank's process: join the group, load the shard, then serve (rank 0) or obey (ranks > 0).

``python -m cloche.sharding.worker --model DIR`` is the entry point under ``torchrun``: it reads
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` from torchrun's
environment (here, at the entry point, and nowhere else). Rank 0 builds a
:class:`~cloche.sharding.executor.ShardedExecutor` and hands a :class:`cloche.Model` over it to
the serve function (``--serve module:function``), ranks > 0 run :func:`command_loop` until
rank 0 says shut down. ``cloche serve --torchrun`` is the same entry with the cloche server as
the serve function; ``cloche.sharding.launch`` starts ranks > 0 in local processes.

Exit codes: 0 after a clean shutdown; 3 when a rank was lost (the message names it).

Shutdown is a handshake, because rank 0's process hosts the control store (under torchrun it
exits as soon as its serve function returns): each rank > 0 answers the shutdown command, stops
every thread that uses the store, says so under ``departed/<rank>`` and then never touches the
store again; rank 0 keeps the store up until every rank has departed (bounded by the fault
bound), so no rank mistakes the end of the group for the loss of rank 0.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cloudpickle
import torch
import torch.distributed as tdist

from cloche.errors import Aborted, ProtocolError, UsageError, WorkerLost
from cloche.model.hub import resolve_model
from cloche.sharding.channel_keys import keys
from cloche.sharding.control import Control
from cloche.sharding.framing import unframe
from cloche.sharding.layout import DistConfig, Layout
from cloche.sharding.p2p import AnyChannel, open_channel
from cloche.sharding.sealing import key_from_token, open_sealed
from cloche.sharding.shard import make_plan, skeleton
from cloche.sharding.stage import Stage, error_envelope

__all__ = ["EXIT_WORKER_LOST", "Rank", "command_loop", "join", "main", "model_directory"]

EXIT_WORKER_LOST = 3
#: the local launcher hands its workers the group's control key in this variable (hex)
CONTROL_KEY_ENV = "CLOCHE_CONTROL_KEY"


@dataclass
class Rank:
    """Everything one rank holds: its layout, control plane, channel and stage."""

    config: DistConfig
    layout: Layout
    control: Control
    channel: AnyChannel
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
    control = None
    try:
        control = Control(layout.store, layout.new_store_client(), layout.rank,
                          layout.world_size, config.timeout_s, config.heartbeat_s, local_check)
        channel = open_channel(control, layout)
        sk = skeleton(config.model_dir, config.dtype)
        plan = make_plan(sk, layout.world_size, config.layers_per_rank)
        stage = Stage(sk, plan, layout.rank, layout.device, control, channel,
                      state_dir=config.state_dir)
    except BaseException:
        # leave no process group behind: this process may start another group later
        if control is not None:
            control.close()
        layout.close()
        raise
    return Rank(config, layout, control, channel, stage)


def _lost_exit(rank: int, grace_s: float = 0.0) -> Callable[[WorkerLost], None]:
    """Report the loss and exit with code 3.

    ``grace_s`` (ranks > 0): when the lost rank is not rank 0, wait this long first (three
    heartbeats). Rank 0 sees the same silence within a heartbeat or two and must tell its
    clients (the request in flight fails with WorkerLost); exiting at once would make torchrun
    stop every other worker of this node — rank 0 too, when it shares the node — before it
    could.
    """
    def on_lost(exc: WorkerLost) -> None:
        if grace_s > 0 and exc.rank != 0:
            threading.Event().wait(grace_s)
        print(f"cloche rank {rank}: {exc}; exiting (code {EXIT_WORKER_LOST})", file=sys.stderr,
              flush=True)
        os._exit(EXIT_WORKER_LOST)
    return on_lost


def receive_sealed(channel: AnyChannel, key: bytes, name: str, rank: int, *,
                   framed: bool = False) -> Any:
    """Wait for rank 0's control message ``name`` and unpickle it — only if rank 0 sealed it.

    ``framed``: a message of ``sharding.framing`` (a command), else a sealed cloudpickle.
    A payload that is not sealed with the group's key is dropped unread (and said on stderr),
    and the wait goes on: a stranger's write neither runs nor stalls anything.
    """
    while True:
        raw = channel.take(0, name)
        try:
            if framed:
                return unframe(key, name, torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            payload = open_sealed(key, name, raw)
        except ProtocolError as exc:
            print(f"cloche rank {rank}: {exc}", file=sys.stderr, flush=True)
            channel.done(name)
            continue
        return cloudpickle.loads(payload)


def send_reply(channel: AnyChannel, name: str, envelope: dict[str, Any], what: str,
               rank: int) -> None:
    """Send an envelope to rank 0; one whose value cannot be pickled becomes a clear error."""
    try:
        channel.send_object(0, name, envelope)
    except Exception as exc:  # noqa: BLE001 - pickling fails in many ways; rank 0 must hear
        failure = UsageError(f"the result of {what} on rank {rank} cannot be sent to rank 0"
                             f" ({type(exc).__name__}: {exc}); keep only tensors and plain"
                             " data in what travels between ranks (saved values, ctx.state)")
        channel.send_object(0, name, error_envelope(failure, aborted=False, rank=rank))


def command_loop(rank: Rank) -> int:
    """Ranks > 0: execute rank 0's commands until it says shut down (returns the exit code)."""
    control, stage, channel = rank.control, rank.stage, rank.channel
    grace = 3 * rank.config.heartbeat_s
    control.on_lost = _lost_exit(rank.layout.rank, grace)
    control.watch_idle = True
    light = LightService(rank)
    light.start()
    seq = 1
    shutting_down = False
    while True:
        try:
            cmd = receive_sealed(channel, rank.layout.key, f"cmd/{seq}", rank.layout.rank,
                                 framed=True)
            if cmd.op == "shutdown":
                # Rank 0 may exit, and the control store it hosts with it, once every rank has
                # departed (or its wait ran out): stop the heartbeat poller now, and read a
                # store that vanishes from here on as the end we were told to reach, not as a
                # lost rank 0.
                shutting_down = True
                control.close()
            control.begin(seq)
            envelope = stage.execute(cmd)
            send_reply(channel, keys.result(seq, rank.layout.rank), envelope, cmd.op,
                       rank.layout.rank)
            channel.flush()
            control.end()
            if cmd.txn is not None:  # rank 0 decides once it heard from every rank
                verdict = channel.take(0, f"decide/{seq}")
                stage.settle(seq, verdict == b"1")
                # reads after this see the outcome
                channel.post(0, f"settled/{seq}/{rank.layout.rank}", b"1")
        except WorkerLost as exc:
            if not shutting_down:
                _lost_exit(rank.layout.rank, grace)(exc)
        except RuntimeError:
            if not shutting_down:
                raise
        if shutting_down:
            light.stop()
            _depart(rank)
            return 0
        seq += 1


def _departed_key(rank: int) -> str:
    return f"departed/{rank}"


def _depart(rank: Rank) -> None:
    """Ranks > 0, after answering shutdown: stop using the store, then tell rank 0 so.

    The heartbeat thread goes first (it would read rank 0's stopped heartbeat, or the store
    rank 0 is about to take down, as a loss); the mark is this rank's last store access.
    """
    rank.control.close()
    try:
        rank.control.store.set(_departed_key(rank.layout.rank), "1")
    except (RuntimeError, tdist.DistStoreError) as exc:  # rank 0 gave up waiting: harmless
        print(f"cloche rank {rank.layout.rank}: could not confirm the shutdown: {exc}",
              file=sys.stderr, flush=True)


def await_departures(rank: Rank) -> bool:
    """Rank 0, after shutdown: keep the store up until every other rank has departed.

    Waits at most the fault bound; returns False (and says which ranks) when it ran out.
    """
    store, world = rank.layout.store, rank.layout.world_size
    wanted = [_departed_key(r) for r in range(1, world)]
    try:
        store.wait(wanted, datetime.timedelta(seconds=rank.config.timeout_s))
        return True
    except (RuntimeError, tdist.DistStoreError) as exc:
        try:
            missing = [r for r in range(1, world) if not store.check([_departed_key(r)])]
        except (RuntimeError, tdist.DistStoreError):
            missing = list(range(1, world))
        print(f"cloche rank 0: rank(s) {missing} did not confirm the shutdown within"
              f" {rank.config.timeout_s:g} s ({exc})", file=sys.stderr, flush=True)
        return False


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
        self.key = layout.key
        self.channel = open_channel(self.control, layout, announce=False)

    def run(self) -> None:
        n = 1
        while True:
            try:
                key = f"light/{self.rank}/{n}"
                op, kwargs = receive_sealed(self.channel, self.key, key, self.rank)
                self.channel.done(key)
                try:
                    reply = {"ok": True, "value": self.stage.light(op, kwargs)}
                except Exception as exc:  # noqa: BLE001 - reported to rank 0, which raises it
                    reply = error_envelope(exc, aborted=False, rank=self.rank)
                send_reply(self.channel, keys.light(self.rank, n), reply, f"{op} (a read)",
                           self.rank)
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


def run_rank(config: DistConfig, serve: Callable[[Any], Any] | None,
             local_check: Callable[[], dict[int, int | None]] | None = None) -> int:
    """Join, then serve (rank 0) or obey (others). Returns the process exit code.

    Rank 0 calls ``serve(model)`` with a :class:`cloche.Model` over the sharded executor;
    returning from it shuts every rank down.
    """
    from cloche.api.model import Model
    from cloche.sharding.executor import ShardedExecutor

    try:
        rank = join(config, local_check)
    except WorkerLost as exc:
        print(f"cloche rank {config.rank}: {exc}", file=sys.stderr, flush=True)
        return EXIT_WORKER_LOST
    if config.rank != 0:
        return command_loop(rank)
    executor = ShardedExecutor(rank, on_lost=_lost_exit(0), micro_batches=config.micro_batches)
    try:
        if serve is None:
            raise UsageError("rank 0 needs a serve function: pass --serve module:function, or"
                             " start the ranks with `cloche serve --torchrun`")
        serve(Model(executor))
    finally:
        executor.close()
        await_departures(rank)  # this process hosts the store: outlive its last reader
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cloche.sharding.worker",
                                     description="one rank of a sharded cloche model")
    parser.add_argument("--model", required=True,
                        help="model directory (safetensors), or a hub name resolved through the"
                             " Hugging Face cache")
    parser.add_argument("--revision", default=None, help="hub revision of --model")
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
    parser.add_argument("--serve", default=None,
                        help="module:function called on rank 0 with the model")
    parser.add_argument("--state-dir", default=None,
                        help="keep this rank's committed save contexts in STATE_DIR/rank-N")
    parser.add_argument("--no-direct-links", dest="direct_links", action="store_false",
                        help="CPU ranks talk through the control store and gloo (as CUDA"
                             " groups do) instead of direct connections; every rank alike")
    return parser.parse_args(argv)


def control_key(env: dict[str, str], token: str | None = None) -> bytes:
    """The group's control key: the local launcher's (``CLOCHE_CONTROL_KEY``), else derived from
    the server token (``token``, else ``CLOCHE_TOKEN``) that every torchrun node shares."""
    if env.get(CONTROL_KEY_ENV):
        try:
            return bytes.fromhex(env[CONTROL_KEY_ENV])
        except ValueError as exc:
            raise UsageError(f"{CONTROL_KEY_ENV} must be hex") from exc
    token = token or env.get("CLOCHE_TOKEN", "").strip()
    if not token:
        raise UsageError("the ranks of a sharded model authenticate each other with the server"
                         " token: set CLOCHE_TOKEN (or pass --token-file) on every node")
    return key_from_token(token)


def config_from_env(env: dict[str, str], *, model_dir: str, layers_per_rank: str | None = None,
                    backend: str | None = None, device: str | None = None,
                    dtype: str | None = None, timeout_s: float = 60.0, micro_batches: int = 1,
                    threads: int | None = None, store_port_offset: int = 1,
                    token: str | None = None, state_dir: str | None = None,
                    direct_links: bool = True) -> DistConfig:
    """The entry point's one look at the environment torchrun (or the launcher) prepared.

    ``token`` is the server token when the caller read it elsewhere (``--token-file``).
    """
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        addr, port = env["MASTER_ADDR"], int(env["MASTER_PORT"])
    except KeyError as exc:
        raise UsageError(f"{exc.args[0]} is not set: run under torchrun, or use"
                         " cloche.sharding.launch.serve_distributed") from exc
    try:
        layers = tuple(int(x) for x in layers_per_rank.split(",")) if layers_per_rank else None
    except ValueError as exc:
        raise UsageError(f"layers per rank are comma-separated ints, not {layers_per_rank!r}"
                         ) from exc
    local_rank = int(env.get("LOCAL_RANK", "0"))
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return DistConfig(model_dir=model_dir, rank=rank, world_size=world, master_addr=addr,
                      master_port=port + store_port_offset, store_is_master=rank == 0,
                      store_prefix="cloche" + (f"/{env['TORCHELASTIC_RESTART_COUNT']}"
                                               if "TORCHELASTIC_RESTART_COUNT" in env else ""),
                      backend=backend, device=device, local_rank=local_rank, dtype=dtype,
                      layers_per_rank=layers, timeout_s=timeout_s,
                      micro_batches=micro_batches, threads=threads,
                      control_key=control_key(env, token), state_dir=state_dir,
                      direct_links=direct_links)


def model_directory(model: str, revision: str | None = None) -> str:
    """The local directory of ``model`` (a directory, or a hub name via the Hugging Face cache).

    A launcher hands its ranks a directory already. Under torchrun each rank resolves a hub name
    itself; the ranks of one machine share a single download (huggingface_hub locks each file
    of the cache while it fetches it, and the others then find it there).
    """
    return str(resolve_model(model, revision=revision).path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_env(
        dict(os.environ), model_dir=model_directory(args.model, args.revision),
        layers_per_rank=args.layers_per_rank,
        backend=args.backend, device=args.device, dtype=args.dtype, timeout_s=args.timeout,
        micro_batches=args.micro_batches, threads=args.threads,
        store_port_offset=args.store_port_offset, state_dir=args.state_dir,
        direct_links=args.direct_links)
    return run_rank(config, _import(args.serve) if args.serve else None)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: C++ threads of the process group may still run
