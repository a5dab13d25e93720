"""Same-host transfer of large frame bodies through shared memory (Linux ``memfd``).

When a notebook and its server run on one machine, a 60 MB result sent over TCP on 127.0.0.1
is copied twice (into the kernel, then into fresh pages the receiver faults in). Here the
sender instead writes the frame's buffers once into an anonymous ``memfd`` (no name in
``/dev/shm``, so nothing can leak past the process), seals it against any change, and sends a
16-byte *descriptor* in place of the body; the receiver opens the file through
``/proc/<sender pid>/fd/<n>``, maps it copy-on-write and builds its tensors as views over the
mapping: no second copy and no page zeroing.

Negotiation (after authentication only, see ``docs/protocol.md``): the side that offers
creates a small memfd holding a random nonce and tells its peer its pid and the fd number.
Only a peer on the same host, running as the same user in the same pid namespace, can open it;
it proves it did with ``HMAC(nonce, label)``. Any failure leaves the connection on plain TCP.

A descriptor names only an fd number: the pid is the one fixed at the negotiation, so a peer
cannot make the receiver open any other path. The receiver checks that the file is a sealed
memfd (no shrinking — which would turn reads of the mapping into SIGBUS —, no growing, no
writes) of exactly the announced size, and the codec checks every buffer against that size.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import logging
import mmap
import os
import secrets
import stat
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cloche.errors import ProtocolError

__all__ = [
    "ALIGN",
    "DESCRIPTOR_SIZE",
    "THRESHOLD",
    "Mapped",
    "Offer",
    "Receiver",
    "Sender",
    "ShmFrameError",
    "accept_offer",
    "available",
    "layout",
    "proof",
]

log = logging.getLogger("cloche.wire.shm")

#: a frame whose buffers take at least this many bytes goes through shared memory
THRESHOLD = 256 * 1024
#: every buffer starts at a multiple of this offset in the shared file (any dtype's alignment)
ALIGN = 64
#: the body of a shared-memory frame: fd number (u32), reserved (u32, 0), file size (u64)
_DESCRIPTOR = struct.Struct(">IIQ")
DESCRIPTOR_SIZE = _DESCRIPTOR.size
NONCE_SIZE = 32
_LABEL = b"cloche-v1/shm\x00"
#: files that are not released by the receiver: past these, frames go over TCP again
_MAX_OUTSTANDING = 64
_MAX_OUTSTANDING_BYTES = 4 << 30
_MAX_FD = (1 << 31) - 1
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)
_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x8)
_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
_REQUIRED_SEALS = _SEAL_SHRINK | _SEAL_GROW | _SEAL_WRITE
_MAP_FLAGS = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)


def available() -> bool:
    """Whether this platform can offer or accept shared memory (Linux with memfd and seals)."""
    return (sys.platform.startswith("linux") and hasattr(os, "memfd_create")
            and hasattr(os, "MFD_ALLOW_SEALING") and hasattr(fcntl, "F_ADD_SEALS")
            and os.path.isdir("/proc/self/fd"))


def layout(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where each buffer starts in the shared file, and the file's size (the last one's end).

    Buffer ``i`` starts at the first multiple of :data:`ALIGN` at or after the end of buffer
    ``i - 1`` (the first at 0): sender and receiver compute the same offsets from the sizes.
    """
    offsets, end = [], 0
    for size in sizes:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + size
    return offsets, end


def proof(nonce: bytes) -> bytes:
    """What a peer that read ``nonce`` from the offered file sends back."""
    return hmac.new(nonce, _LABEL, hashlib.sha256).digest()


def _sealed_memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        written = os.pwrite(fd, view, offset)
        if written <= 0:
            raise OSError(errno.EIO, "short write to a shared memory file")
        view, offset = view[written:], offset + written


def _seal(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _REQUIRED_SEALS | _SEAL_SEAL)


def _open_peer_file(pid: Any, fd: Any) -> int:
    """Open the peer's ``/proc/<pid>/fd/<fd>``: the one path a peer can make us open."""
    if type(pid) is not int or type(fd) is not int or not (0 < pid <= _MAX_FD
                                                          and 0 <= fd <= _MAX_FD):
        raise ProtocolError("malformed shared memory reference")
    try:
        return os.open(f"/proc/{pid}/fd/{fd}", _OPEN_FLAGS)
    except OSError as exc:
        raise ProtocolError(f"cannot open the peer's shared memory file (fd {fd}): {exc}"
                            ) from exc


def _check_sealed(fd: int, size: int | None) -> int:
    """The size of the sealed memfd ``fd``; ProtocolError if it is anything else."""
    try:
        info = os.fstat(fd)
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:  # EINVAL: not a file that supports seals (not a memfd)
        raise ProtocolError(f"the peer's shared memory reference is not a sealed memfd: {exc}"
                            ) from exc
    if not stat.S_ISREG(info.st_mode) or seals & _REQUIRED_SEALS != _REQUIRED_SEALS:
        raise ProtocolError("the peer's shared memory reference is not a sealed memfd")
    if size is not None and info.st_size != size:
        raise ProtocolError(f"the peer's shared memory file has {info.st_size} bytes, the frame"
                            f" announced {size}")
    return info.st_size


# ------------------------------------------------------------------------------ negotiation


class Offer:
    """The offering side: a sealed memfd holding a nonce, open until :meth:`close`."""

    def __init__(self) -> None:
        self._nonce = secrets.token_bytes(NONCE_SIZE)
        self.fd = _sealed_memfd("cloche-shm-offer", NONCE_SIZE)
        try:
            _pwrite_all(self.fd, self._nonce, 0)
            _seal(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        self.pid = os.getpid()

    def message(self) -> dict[str, int]:
        """The offer's fields: ``{"pid", "fd"}``."""
        return {"pid": self.pid, "fd": self.fd}

    def check(self, peer_proof: Any) -> bool:
        """Whether ``peer_proof`` shows that the peer read the nonce."""
        return isinstance(peer_proof, bytes) and hmac.compare_digest(peer_proof,
                                                                     proof(self._nonce))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def accept_offer(offer: Any) -> tuple[int, bytes]:
    """Open a peer's offer (``{"pid", "fd"}``): its pid and the proof to send back.

    Raises ProtocolError when the file cannot be opened or is not a sealed nonce (another
    host, another user, another pid namespace, or a peer without the feature).
    """
    if type(offer) is not dict:
        raise ProtocolError("malformed shared memory offer")
    pid: Any = offer.get("pid")
    fd: Any = offer.get("fd")
    opened = _open_peer_file(pid, fd)  # checks that both are ints
    try:
        _check_sealed(opened, NONCE_SIZE)
        nonce = os.pread(opened, NONCE_SIZE, 0)
    except OSError as exc:
        raise ProtocolError(f"cannot read the peer's shared memory offer: {exc}") from exc
    finally:
        os.close(opened)
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError("the peer's shared memory offer is truncated")
    return pid, proof(nonce)


# -------------------------------------------------------------------------------- transfer


class Sender:
    """Writes frame bodies into sealed memfds and keeps each open until the peer releases it.

    ``write`` returns the descriptor to send as the frame's body, or None (the frame then goes
    over TCP) when the peer holds too many unreleased files or the write fails (no memory).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[int, int] = {}  # fd -> size
        self._bytes = 0
        self._closed = False

    def write(self, buffers: Sequence[memoryview]) -> bytes | None:
        offsets, size = layout([buf.nbytes for buf in buffers])
        with self._lock:
            if (self._closed or len(self._open) >= _MAX_OUTSTANDING
                    or self._bytes + size > _MAX_OUTSTANDING_BYTES):
                return None
        try:
            fd = _sealed_memfd("cloche-frame", size)
        except OSError as exc:
            log.debug("shared memory unavailable for a frame of %d bytes: %s", size, exc)
            return None
        try:
            for buf, offset in zip(buffers, offsets, strict=True):
                if buf.nbytes:
                    _pwrite_all(fd, buf, offset)
            _seal(fd)
        except OSError as exc:
            os.close(fd)
            log.debug("shared memory write of %d bytes failed: %s", size, exc)
            return None
        with self._lock:
            if self._closed:
                os.close(fd)
                return None
            self._open[fd] = size
            self._bytes += size
        return _DESCRIPTOR.pack(fd, 0, size)

    def release(self, fd: Any) -> bool:
        """Close file ``fd`` once the peer has opened it; False if it is not one of ours."""
        with self._lock:
            size = self._open.pop(fd, None) if type(fd) is int else None
            if size is None:
                return False
            self._bytes -= size
        os.close(fd)
        return True

    @property
    def outstanding(self) -> int:
        """Files written and not yet released by the peer."""
        return len(self._open)

    def close(self) -> None:
        """Close every file still open (the connection is ending)."""
        with self._lock:
            self._closed = True
            fds, self._open, self._bytes = list(self._open), {}, 0
        for fd in fds:
            os.close(fd)


class ShmFrameError(ProtocolError):
    """A shared-memory frame whose file could not be mapped. The frame was read whole, so the
    stream is still in sync: ``peek`` is its message with every tensor left out (None), enough
    to fail the one request it answers."""

    def __init__(self, message: str, peek: Any = None) -> None:
        super().__init__(message)
        self.peek = peek


@dataclass(frozen=True)
class Mapped:
    """A peer's frame body mapped copy-on-write: tensors are views over ``buffer``."""

    buffer: mmap.mmap
    size: int


class Receiver:
    """Maps the frames a peer (process ``pid``) sent through shared memory.

    ``release(fd)`` is called once per descriptor, as soon as the file is open here or could
    not be opened, so that the peer closes its copy of the descriptor.
    """

    def __init__(self, pid: int, release: Callable[[int], None], *, max_size: int) -> None:
        self.pid = pid
        self._release = release
        self.max_size = max_size

    def map(self, descriptor: bytes | bytearray) -> Mapped:
        if len(descriptor) != DESCRIPTOR_SIZE:
            raise ProtocolError(f"a shared memory descriptor is {DESCRIPTOR_SIZE} bytes,"
                                f" got {len(descriptor)}")
        fd, reserved, size = _DESCRIPTOR.unpack(descriptor)
        if reserved != 0:
            raise ProtocolError("reserved bits of a shared memory descriptor are set")
        if fd > _MAX_FD:  # never released: it cannot be one of the peer's descriptors
            raise ProtocolError(f"bad fd {fd} in a shared memory descriptor")
        try:
            if not 0 < size <= self.max_size:
                raise ProtocolError(f"a shared memory frame of {size} bytes exceeds the limit"
                                    f" of {self.max_size} bytes")
            opened = _open_peer_file(self.pid, fd)
        finally:
            self._release(fd)
        try:
            _check_sealed(opened, size)
            try:
                buffer = mmap.mmap(opened, size, flags=_MAP_FLAGS,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError) as exc:
                raise ProtocolError(f"cannot map the peer's shared memory file: {exc}") from exc
        finally:
            os.close(opened)
        return Mapped(buffer, size)
