"""The process-group layout: world size, ranks, devices, groups and the control store.

One object owns all of it; everything else asks it. Tensors (activations, gradients, logits)
travel on the *tensor group* — NCCL on GPUs, gloo on CPUs. Everything else (commands, results,
saved data, heartbeats, cancellation) travels on the *control plane*: a TCP key-value store
(``torch.distributed.TCPStore``) whose waits can be sliced and retried, and a gloo group for
pickled objects. No collective is ever started without a timeout, and no data-plane operation is
posted before its peer has announced it (see ``sharding.p2p``), so the process-group timeout bounds
only transfers, never a peer's thinking time. CPU groups also open a direct connection between
every pair of ranks (``sharding.links``), which then carries all their messages.
"""

from __future__ import annotations

import datetime
import socket
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from cloche.errors import UsageError, WorkerLost
from cloche.sharding.links import Links, reachable_host
from cloche.sharding.sealing import store_prefix

__all__ = ["DistConfig", "Layout"]


@dataclass(frozen=True, kw_only=True)
class DistConfig:
    """How one rank joins the group. Parsed once at the entry point (never from os.environ here).

    ``timeout_s`` is the fault bound: a rank that dies or stops answering is reported as
    ``WorkerLost`` within about this many seconds. ``connect_timeout_s`` bounds start-up (all
    ranks loading and meeting). ``store_is_master``: whether this rank hosts the control store
    (default: rank 0 does). Under torchrun rank 0 hosts it at ``MASTER_PORT +
    --store-port-offset``, beside the agent's own rendezvous store at ``MASTER_PORT``.
    """

    model_dir: str
    rank: int
    world_size: int
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    store_is_master: bool | None = None
    store_prefix: str = "cloche"
    backend: str | None = None
    device: str | None = None
    local_rank: int = 0
    dtype: str | None = None
    layers_per_rank: tuple[int, ...] | None = None
    timeout_s: float = 60.0
    connect_timeout_s: float = 300.0
    micro_batches: int = 1
    threads: int | None = None
    control_key: bytes = field(default=b"", repr=False)
    state_dir: str | None = None  # each rank keeps its save contexts in state_dir/rank-{r}
    #: CPU (gloo) groups: messages between ranks go over direct connections (sharding.links)
    direct_links: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.control_key, bytes) or len(self.control_key) < 16:
            raise UsageError("the group needs a control key of at least 16 bytes, the same on"
                             " every rank (a local launch draws one; under torchrun it is"
                             " derived from the server token, CLOCHE_TOKEN or --token-file)")
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) \
                or self.world_size < 2:
            raise UsageError(f"world_size ({self.world_size!r}) must be an int >= 2"
                             " (world size 1 is the plain local model)")
        if not 0 <= self.rank < self.world_size:
            raise UsageError(f"rank ({self.rank}) must be in [0, {self.world_size})")
        if not self.timeout_s > 0:
            raise UsageError(f"timeout_s ({self.timeout_s}) must be positive")
        if self.backend not in (None, "gloo", "nccl"):
            raise UsageError(f"backend ({self.backend!r}) must be 'gloo', 'nccl' or None")
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) \
                or self.micro_batches < 1:
            raise UsageError(f"micro_batches ({self.micro_batches!r}) must be a positive int")

    @property
    def heartbeat_s(self) -> float:
        return min(max(self.timeout_s / 6.0, 0.05), 5.0)


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` only (TCPStore alone would listen on every address)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        raise UsageError(f"cannot listen for the other ranks on {host}:{port}: {exc}") from exc
    return sock


class Layout:
    """Joins the process group described by a :class:`DistConfig` and owns its groups."""

    def __init__(self, config: DistConfig) -> None:
        self.config = config
        self.rank = config.rank
        self.world_size = config.world_size
        backend = config.backend
        device = config.device
        if device is None:
            device = f"cuda:{config.local_rank}" if backend == "nccl" else "cpu"
        if device == "cuda":
            device = f"cuda:{config.local_rank}"
        if backend is None:
            backend = "nccl" if str(device).startswith("cuda") else "gloo"
        if backend == "nccl" and not str(device).startswith("cuda"):
            raise UsageError(f"the nccl backend needs a cuda device, not {device!r}")
        self.backend = backend
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        is_master = config.store_is_master
        if is_master is None:
            is_master = config.rank == 0
        self._store_args = (config.master_addr, config.master_port)
        self.key = config.control_key
        self._prefix = f"{config.store_prefix}/{store_prefix(self.key)}/"
        connect = datetime.timedelta(seconds=config.connect_timeout_s)
        # the hosting rank listens only on the address the others were told to reach; the
        # store takes over the socket (its file descriptor) for the life of the process
        listen_fd = _listen(config.master_addr, config.master_port).detach() if is_master \
            else None
        try:
            base = tdist.TCPStore(config.master_addr, config.master_port, None,
                                  is_master=is_master, timeout=connect, wait_for_workers=False,
                                  master_listen_fd=listen_fd)
        except (RuntimeError, tdist.DistStoreError) as exc:
            raise WorkerLost(f"rank {self.rank} could not reach the control store at"
                             f" {config.master_addr}:{config.master_port}: {exc}") from exc
        self._base_store = base  # keeps the server alive on the hosting rank
        self.store = tdist.PrefixStore(self._prefix, base)
        self._meet(connect)
        timeout = datetime.timedelta(seconds=config.timeout_s)
        tdist.init_process_group(backend, store=tdist.PrefixStore("pg/", self.store),
                                 rank=self.rank, world_size=self.world_size, timeout=timeout)
        self.tensor_group = tdist.group.WORLD
        if backend == "gloo":
            self.object_group = self.tensor_group
        else:
            self.object_group = tdist.new_group(backend="gloo", timeout=timeout)
        #: this rank's direct connections to the others (CPU groups), else None
        self.links: Links | None = None
        if backend == "gloo" and config.direct_links:
            self.links = Links.open(self.store, self.rank, self.world_size, self.key,
                                    reachable_host(config.master_addr),
                                    config.connect_timeout_s)

    def _meet(self, timeout: datetime.timedelta) -> None:
        """Wait (bounded) until every rank has reached the store, so the group forms at once."""
        self.store.set(f"hb/{self.rank}", "0")
        self.store.add("joined", 1)
        deadline = time.monotonic() + timeout.total_seconds()
        while int(self.store.add("joined", 0)) < self.world_size:
            if time.monotonic() > deadline:
                raise WorkerLost(f"only {int(self.store.add('joined', 0))} of {self.world_size}"
                                 f" ranks joined within {timeout.total_seconds():.0f} s (every"
                                 " rank needs the same control key: the same server token)")
            time.sleep(0.05)

    @property
    def last(self) -> int:
        return self.world_size - 1

    def new_store_client(self) -> tdist.Store:
        """A separate connection to the control store (one per thread that waits on it)."""
        host, port = self._store_args
        client = tdist.TCPStore(host, port, None, is_master=False,
                                timeout=datetime.timedelta(seconds=self.config.connect_timeout_s),
                                wait_for_workers=False)
        return tdist.PrefixStore(self._prefix, client)

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
        if tdist.is_initialized():
            try:
                tdist.destroy_process_group()
            except (RuntimeError, ValueError):
                pass
