"""Point-to-point transfers that never wait on a peer that is thinking, dead or gone.

A message has a key both sides compute (``"{command}/{pass}/act/0>1"``). The sender posts the
tensor with a non-blocking ``isend`` (gloo and NCCL both hold it until the receiver posts its
``recv``) and announces it in the store with its shape and dtype. The receiver waits for the
announcement on the control plane (sliced, liveness- and abort-checked, see ``sharding.control``),
then posts a ``recv`` that completes at once, and acknowledges. A sender keeps at most
``window`` unacknowledged messages per peer, which bounds memory and lets consecutive
micro-batches overlap across ranks.

If a command is aborted, a sender does not wait for acknowledgements that will never come: its
unreceived sends are parked. Every announcement is also listed per command and receiver, and
before the next command each rank receives and drops whatever was announced to it but not
consumed (:meth:`Channel.drain`), so no stale message is ever matched by a later receive (NCCL
matches messages by order, not by tag) and parked sends complete.

This is the path of CUDA (NCCL) groups. CPU groups keep the same contract over direct
connections between the ranks, without the store (:class:`~cloche.sharding.direct.DirectChannel`);
:func:`open_channel` picks one. Control messages (commands, decisions, light requests) go the
same way: :meth:`Channel.post` / :meth:`Channel.take`.
"""

from __future__ import annotations

import collections
import zlib
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist

from cloche.errors import Cancelled, WorkerLost
from cloche.sharding.control import Aborted, Control
from cloche.sharding.direct import DirectChannel
from cloche.sharding.framing import frame, unframe

if TYPE_CHECKING:
    from cloche.sharding.layout import Layout

__all__ = ["AnyChannel", "Channel", "open_channel"]


def _tag(key: str) -> int:
    return zlib.crc32(key.encode()) & 0x3FFFFFFF


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


class Channel:
    """Sends and receives tensors and objects between this rank and its peers."""

    def __init__(self, control: Control, rank: int, device: torch.device,
                 tensor_group: Any, object_group: Any, *, key: bytes, window: int = 2,
                 announce: bool = True) -> None:
        self.control = control
        self.key = key  # seals objects: nothing is unpickled unless a rank of this group sent it
        self.rank = rank
        self.device = device
        self.tensor_group = tensor_group
        self.object_group = object_group
        self.window = window
        self.announce = announce  # list messages for drain (off for the light channel)
        self._pending: dict[tuple[int, str | None],
                            collections.deque[tuple[str, Any, torch.Tensor]]] = {}
        self._parked: list[tuple[int | None, Any, torch.Tensor]] = []
        self.command: int | None = None
        self._consumed: set[str] = set()

    # ----------------------------------------------------------------- sending
    def send(self, dst: int, key: str, tensor: torch.Tensor, *, objects: bool = False,
             stream: str | None = None) -> None:
        """Post ``tensor`` for ``dst`` under ``key`` (returns without waiting for ``dst``).

        Messages of one ``stream`` (e.g. the activations to the next rank) are received in the
        order they are sent, so at most ``window`` of them are kept in flight; other messages
        are only settled at :meth:`flush` (their receiver may take them in another order).
        """
        group = self.object_group if objects else self.tensor_group
        queue = self._pending.setdefault((dst, stream), collections.deque())
        while stream is not None and len(queue) >= self.window:
            self._settle(queue.popleft())
        if not objects and tensor.device != self.device:
            tensor = tensor.to(self.device)
        tensor = tensor.detach().contiguous()
        work = tdist.isend(tensor, dst, group=group, tag=_tag(key))
        header = f"{'x'.join(map(str, tensor.shape))};{tensor.dtype};{int(objects)}"
        self.control.store.set(f"m/{key}", header)
        if self.announce:
            self.control.store.append(  # type: ignore[attr-defined]  # TCPStore/PrefixStore have it
                f"ann/{self.command}/{dst}", f"{self.rank}|{key}\n")
        queue.append((key, work, tensor))

    def send_object(self, dst: int, key: str, value: Any, *, stream: str | None = None
                    ) -> None:
        """Send a picklable ``value``, sealed (``sharding.sealing``): raises if it cannot pickle."""
        sealed = frame(self.key, f"obj/{key}", value)
        self.send(dst, key, sealed, objects=True, stream=stream)

    def _settle(self, item: tuple[str, Any, torch.Tensor], *, abortable: bool = True) -> None:
        key, work, tensor = item
        try:
            self.control.wait(f"a/{key}", command=self.command, abortable=abortable)
        except (Aborted, Cancelled):
            self._parked.append((self.command, work, tensor))
            raise
        self.control.store.delete_key(f"a/{key}")
        try:
            work.wait()
        except RuntimeError as exc:
            raise WorkerLost(f"sending {key} failed: {exc}") from exc

    def flush(self, *, aborted: bool = False) -> None:
        """Wait until every message of this command was received (park them when aborted)."""
        for queue in self._pending.values():
            while queue:
                item = queue.popleft()
                if aborted or self.control.abort_event.is_set():
                    self._parked.append((self.command, item[1], item[2]))
                    continue
                try:
                    self._settle(item)
                except (Aborted, Cancelled):
                    aborted = True

    # ----------------------------------------------------------------- receiving
    def recv(self, src: int, key: str, *, abortable: bool = True) -> torch.Tensor:
        """The tensor ``src`` sent under ``key`` (on this rank's device)."""
        raw = self.control.wait(f"m/{key}", command=self.command, abortable=abortable).decode()
        self.control.store.delete_key(f"m/{key}")
        shape_text, dtype_name, objects = raw.split(";")
        shape = tuple(int(s) for s in shape_text.split("x")) if shape_text else ()
        is_object = objects == "1"
        device = torch.device("cpu") if is_object else self.device
        out = torch.empty(shape, dtype=_dtype(dtype_name), device=device)
        group = self.object_group if is_object else self.tensor_group
        try:
            tdist.recv(out, src, group=group, tag=_tag(key))
        except RuntimeError as exc:
            raise WorkerLost(f"rank {src} was lost while sending {key}: {exc}", rank=src) from exc
        self.control.store.set(f"a/{key}", "1")
        self._consumed.add(key)
        return out

    def drain(self, command: int) -> int:
        """Receive and drop what was announced to this rank in ``command`` but not consumed.

        Called when every rank has finished ``command`` (before the next one), so every
        announced message has been posted. Returns how many messages were dropped.
        """
        key = f"ann/{command}/{self.rank}"
        store = self.control.store
        dropped = 0
        if store.check([key]):
            for line in bytes(store.get(key)).decode().split():
                src, _, name = line.partition("|")
                if name in self._consumed:
                    continue
                self.command = None
                self.recv(int(src), name, abortable=False)
                dropped += 1
            store.delete_key(key)
        self._consumed.clear()
        # every rank drained command - 1 when it started ``command``: those sends are complete
        done = [p for p in self._parked if p[0] is not None and p[0] < command]
        self._parked = [p for p in self._parked if not (p[0] is not None and p[0] < command)]
        for _, work, _tensor in done:
            try:
                work.wait()
            except RuntimeError as exc:
                raise WorkerLost(f"a send of command {command - 1} failed: {exc}") from exc
        return dropped

    def recv_object(self, src: int, key: str, *, abortable: bool = True) -> Any:
        """An object ``src`` sent with :meth:`send_object`; refused unless its seal verifies."""
        data = self.recv(src, key, abortable=abortable)
        return unframe(self.key, f"obj/{key}", data)

    # ----------------------------------------------------------------- control messages
    def post(self, dst: int, name: str, payload: bytes) -> None:
        """A control message (a command, a decision; sealed by the caller): a store key here,
        which every rank may read (``dst`` is who waits for it)."""
        self.control.store.set(name, payload)  # type: ignore[arg-type]  # bytes work too

    def take(self, src: int, name: str) -> bytes:
        """A control message posted under ``name`` (waits, checking liveness, not aborts)."""
        return self.control.wait(name, abortable=False)

    def done(self, name: str) -> None:
        """Every reader has taken ``name``: remove it from the store."""
        self.control.store.delete_key(name)


#: what a rank sends and receives through: direct connections on CPU groups, else the store
AnyChannel = Channel | DirectChannel


def open_channel(control: Control, layout: Layout, *, announce: bool = True) -> AnyChannel:
    """A channel for one thread of this rank (``announce``: see :class:`Channel`)."""
    if layout.links is not None:
        return DirectChannel(control, layout.links, layout.rank, layout.device, key=layout.key)
    return Channel(control, layout.rank, layout.device, layout.tensor_group,
                   layout.object_group, key=layout.key, announce=announce)
