"""Point-to-point transfers over the ranks' direct connections (CPU groups; ``sharding.links``).

The same contract as :class:`~cloche.sharding.p2p.Channel` — a key both sides compute, at most
``window`` unacknowledged messages per stream, waits that notice an abort, a shutdown or a lost
rank, and no stale message ever matched by a later receive — without the control store: a
message is written to the peer's connection at once and read into the peer's mailbox by its
reader thread; a stream's receiver acknowledges on the same connection; :meth:`drain` drops
what a finished command left behind. A send never waits for the receiver to post anything, so
there is nothing to park when a command is aborted.
"""

from __future__ import annotations

import collections
from typing import Any

import torch

from cloche.sharding.control import Control
from cloche.sharding.framing import frame, unframe
from cloche.sharding.links import ACK, Links

__all__ = ["DirectChannel"]


class DirectChannel:
    """Sends and receives tensors and objects between this rank and its peers."""

    def __init__(self, control: Control, links: Links, rank: int, device: torch.device, *,
                 key: bytes, window: int = 2) -> None:
        self.control = control
        self.links = links
        self.key = key  # seals objects: nothing is unpickled unless a rank of this group sent it
        self.rank = rank
        self.device = device
        self.window = window
        self.command: int | None = None
        self._pending: dict[tuple[int, str], collections.deque[str]] = {}

    def _checkpoint(self, what: str, abortable: bool) -> Any:
        command = self.command

        def check(slow: bool) -> None:
            self.control.between_slices(what, command=command, abortable=abortable, slow=slow)
        return check

    def _liveness(self) -> None:
        self.control.liveness.check()

    # ----------------------------------------------------------------- sending
    def send(self, dst: int, key: str, tensor: torch.Tensor, *, objects: bool = False,
             stream: str | None = None) -> None:
        """Write ``tensor`` to ``dst`` under ``key`` (returns once it is with the kernel).

        Messages of one ``stream`` are received in the order they are sent; the sender keeps
        at most ``window`` of them unacknowledged, which bounds what a slow receiver holds.
        """
        if stream is not None:
            queue = self._pending.setdefault((dst, stream), collections.deque())
            while len(queue) >= self.window:
                oldest = queue.popleft()
                self.links.take(dst, ACK + oldest, checkpoint=self._checkpoint(
                    f"the acknowledgement of {oldest}", True))
        if not objects and tensor.device.type != "cpu":
            tensor = tensor.cpu()
        tensor = tensor.detach().contiguous()
        self.links.send(dst, key, tensor, command=self.command, objects=objects,
                        wants_ack=stream is not None, check=self._liveness)
        if stream is not None:
            queue.append(key)

    def send_object(self, dst: int, key: str, value: Any, *, stream: str | None = None
                    ) -> None:
        """Send a picklable ``value``, sealed (``sharding.sealing``): raises if it cannot pickle."""
        sealed = frame(self.key, f"obj/{key}", value)
        self.send(dst, key, sealed, objects=True, stream=stream)

    def flush(self, *, aborted: bool = False) -> None:
        """Every message of this command is already written: forget the acknowledgements."""
        self._pending.clear()

    # ----------------------------------------------------------------- receiving
    def recv(self, src: int, key: str, *, abortable: bool = True) -> torch.Tensor:
        """The tensor ``src`` sent under ``key`` (on this rank's device)."""
        command, tensor, wants_ack = self.links.take(
            src, key, checkpoint=self._checkpoint(key, abortable))
        assert tensor is not None
        if wants_ack:  # sent on a stream: its sender counts what is unacknowledged
            self.links.send(src, key, None, command=None if command < 0 else command,
                            ack=True, check=self._liveness)
        return tensor if self.device.type == "cpu" else tensor.to(self.device)

    def drain(self, command: int) -> int:
        """Drop what ``command`` (and earlier) left unreceived here, and what still arrives."""
        self._pending.clear()
        return self.links.drop_through(command)

    def recv_object(self, src: int, key: str, *, abortable: bool = True) -> Any:
        """An object ``src`` sent with :meth:`send_object`; refused unless its seal verifies."""
        data = self.recv(src, key, abortable=abortable)
        return unframe(self.key, f"obj/{key}", data)

    # ----------------------------------------------------------------- control messages
    def post(self, dst: int, name: str, payload: bytes) -> None:
        """A control message (a command, a decision; sealed by the caller) for ``dst``."""
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else \
            torch.empty(0, dtype=torch.uint8)
        self.links.send(dst, name, data, command=None, check=self._liveness)

    def take(self, src: int, name: str) -> bytes:
        """The control message ``src`` posted under ``name`` (waits; not abortable)."""
        _, data, _ = self.links.take(src, name, checkpoint=self._checkpoint(name, False))
        assert data is not None
        return data.numpy().tobytes()

    def done(self, name: str) -> None:
        """Nothing to clean up: a control message is gone once taken."""
