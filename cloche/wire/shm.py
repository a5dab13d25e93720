"""Same-host transfer of large frame bodies through shared memory (Linux ``memfd``).

When a notebook and its server run on one machine, a 60 MB result sent over TCP on 127.0.0.1
is copied twice (into the kernel, then into fresh pages the receiver faults in). Here the
sender instead writes the frame's buffers into an anonymous ``memfd`` (no name in
``/dev/shm``, so nothing can leak past the process) and sends a 16-byte *descriptor* in place
of the body; the receiver opens the file through ``/proc/<sender pid>/fd/<n>``, maps it
copy-on-write and builds its tensors as views over the mapping: no second copy, no page zeroing.

The sender keeps a small pool of such files per connection and writes the next frame into a
file the receiver has given back: writing into pages that already exist is a plain memcpy,
where a fresh file costs a page allocation per 4 KiB (as much as the TCP copy it replaces).
The receiver gives a file back (``shm_release``) once its mapping is gone — when the last
tensor over it is freed —, never earlier, so a file is never rewritten under a live tensor.

Negotiation (after authentication only, see ``docs/protocol.md``): the side that offers
creates a small memfd holding a random nonce and tells its peer its pid and the fd number.
Only a peer on the same host, running as the same user in the same pid namespace, can open it;
it proves it did with ``HMAC(nonce, label)``. Any failure leaves the connection on plain TCP.

A descriptor names only an fd number: the pid is the one fixed at the negotiation, so a peer
cannot make the receiver open any other path. The receiver checks that the file is a memfd
sealed against shrinking (truncating a mapped file would turn reads of the mapping into
SIGBUS) that holds at least the announced size, and the codec checks every buffer against
that size.
"""

from __future__ import annotations

import collections
import ctypes
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
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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
    "proven_sender",
    "take_back",
]

log = logging.getLogger("cloche.wire.shm")

#: a frame whose buffers take at least this many bytes goes through shared memory: below it,
#: the fixed cost (open, map, unmap, a release frame: ~80 µs) outweighs the copies saved
#: (over TCP on 127.0.0.1: 256 KiB 0.68 ms by TCP, 0.90 ms shared; 1 MiB 1.8 ms, 1.3 ms)
THRESHOLD = 1 << 20
#: every buffer starts at a multiple of this offset in the shared file (any dtype's alignment)
ALIGN = 64
#: the body of a shared-memory frame: fd number (u32), reserved (u32, 0), file size (u64)
_DESCRIPTOR = struct.Struct(">IIQ")
DESCRIPTOR_SIZE = _DESCRIPTOR.size
NONCE_SIZE = 32
_LABEL = b"cloche-v1/shm\x00"
#: files the receiver holds (not given back): past these, frames go over TCP again
_MAX_OUTSTANDING = 64
_MAX_OUTSTANDING_BYTES = 4 << 30
#: given-back files kept for reuse by a connection (their pages stay allocated)
_MAX_IDLE = 4
_MAX_IDLE_BYTES = 256 << 20
_MAX_FD = (1 << 31) - 1
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_SEAL_GROW = getattr(fcntl, "F_SEAL_GROW", 0x4)
_SEAL_WRITE = getattr(fcntl, "F_SEAL_WRITE", 0x8)
_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
#: a frame file can grow (to be reused for a bigger frame) but never shrink under a mapping
_FRAME_SEALS = _SEAL_SHRINK
_OFFER_SEALS = _SEAL_SHRINK | _SEAL_GROW | _SEAL_WRITE
#: copy-on-write: the receiver's tensors are writable, and a write copies only the pages it
#: touches. Not MAP_POPULATE: on a writable private mapping it would break copy-on-write of
#: every page up front (a full copy); read faults map 16 pages at a time (fault-around)
_MAP_FLAGS = mmap.MAP_PRIVATE


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


def _seal(fd: int, seals: int) -> None:
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals | _SEAL_SEAL)


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


def _check_sealed(fd: int, seals: int, size: int) -> None:
    """ProtocolError unless ``fd`` is a memfd with ``seals`` holding at least ``size`` bytes."""
    try:
        info = os.fstat(fd)
        present = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as exc:  # EINVAL: not a file that supports seals (not a memfd)
        raise ProtocolError(f"the peer's shared memory reference is not a sealed memfd: {exc}"
                            ) from exc
    if not stat.S_ISREG(info.st_mode) or present & seals != seals:
        raise ProtocolError("the peer's shared memory reference is not a sealed memfd")
    if info.st_size < size:
        raise ProtocolError(f"the peer's shared memory file has {info.st_size} bytes, the frame"
                            f" announced {size}")


# ------------------------------------------------------------------------------ negotiation


class Offer:
    """The offering side: a sealed memfd holding a nonce, open until :meth:`close`."""

    def __init__(self) -> None:
        self._nonce = secrets.token_bytes(NONCE_SIZE)
        self.fd = _sealed_memfd("cloche-shm-offer", NONCE_SIZE)
        try:
            _pwrite_all(self.fd, self._nonce, 0)
            _seal(self.fd, _OFFER_SEALS)
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
        _check_sealed(opened, _OFFER_SEALS, NONCE_SIZE)
        nonce = os.pread(opened, NONCE_SIZE, 0)
    except OSError as exc:
        raise ProtocolError(f"cannot read the peer's shared memory offer: {exc}") from exc
    finally:
        os.close(opened)
    if len(nonce) != NONCE_SIZE:
        raise ProtocolError("the peer's shared memory offer is truncated")
    return pid, proof(nonce)


def proven_sender(offer: Offer | None, peer_proof: Any) -> Sender | None:
    """After the peer's proof: a :class:`Sender` if it read ``offer``'s nonce, else None (the
    connection stays on TCP). A proof nobody offered for is a ProtocolError."""
    if offer is None:
        raise ProtocolError("a shared memory proof without an offer")
    return Sender() if offer.check(peer_proof) else None


def take_back(sender: Sender | None, fds: Any) -> None:
    """Take back, for reuse, the files a peer's ``shm_release`` names.

    A ProtocolError (which ends the connection) when the message is malformed or names a file
    this side did not send that peer or that the peer no longer holds.
    """
    if sender is None or type(fds) is not list:
        raise ProtocolError("a malformed shm_release")
    for fd in fds:
        if not sender.release(fd):
            raise ProtocolError(f"shm_release of {fd!r}, which is not a shared memory file"
                                " the peer holds"[:160])


# -------------------------------------------------------------------------------- transfer


class _File:
    """One of a sender's frame files, mapped shared into the sender for as long as it lives:
    a frame is one memcpy into pages that stay mapped, not a write() that looks every page up
    in the page cache (3× slower), nor fresh page faults."""

    __slots__ = ("address", "capacity", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.capacity = 0
        self.address = 0

    def ensure(self, size: int) -> None:
        """Grow the file (and its mapping) to hold ``size`` bytes (a frame file never shrinks)."""
        if size <= self.capacity:
            return
        self.unmap()
        os.ftruncate(self.fd, size)
        self.address = _map(self.fd, size, _SHARED_FLAGS, OSError)
        self.capacity = size

    def unmap(self) -> None:
        if self.address:
            _libc.munmap(self.address, self.capacity)
            self.address, self.capacity = 0, 0

    def close(self) -> None:
        self.unmap()
        os.close(self.fd)


class Sender:
    """Writes frame bodies into memfds the peer maps, reusing the files it gives back.

    ``write`` returns the descriptor to send as the frame's body, or None (the frame then goes
    over TCP) when the peer holds too many files or the write fails (no memory). A file stays
    the peer's until :meth:`release`; then it is kept for reuse (up to ``_MAX_IDLE`` files).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, _File] = {}  # by fd: mapped by the peer
        self._idle: dict[int, _File] = {}  # by fd: given back, reusable
        self._held_bytes = 0
        self._closed = False

    def write(self, buffers: Sequence[memoryview]) -> bytes | None:
        offsets, size = layout([buf.nbytes for buf in buffers])
        with self._lock:
            if (self._closed or len(self._held) >= _MAX_OUTSTANDING
                    or self._held_bytes + size > _MAX_OUTSTANDING_BYTES):
                return None
            file = self._take_idle(size)
        try:
            if file is None:
                file = _File(_sealed_memfd("cloche-frame", 0))
                _seal(file.fd, _FRAME_SEALS)
            file.ensure(size)
            for buf, offset in zip(buffers, offsets, strict=True):
                if buf.nbytes:
                    source = np.frombuffer(buf, dtype=np.uint8)
                    ctypes.memmove(file.address + offset, source.ctypes.data, buf.nbytes)
        except OSError as exc:
            if file is not None:
                file.close()
            log.debug("shared memory write of %d bytes failed: %s", size, exc)
            return None
        with self._lock:
            if self._closed:
                file.close()
                return None
            self._held[file.fd] = file
            self._held_bytes += file.capacity
        return _DESCRIPTOR.pack(file.fd, 0, size)

    def _take_idle(self, size: int) -> _File | None:
        """An idle file for a frame of ``size`` bytes: the smallest that holds it, else the
        largest (to grow), else None. Called with the lock held."""
        if not self._idle:
            return None
        files = self._idle.values()
        fits = [file for file in files if file.capacity >= size]
        file = (min(fits, key=lambda f: f.capacity) if fits
                else max(files, key=lambda f: f.capacity))
        del self._idle[file.fd]
        return file

    def release(self, fd: Any) -> bool:
        """The peer has unmapped file ``fd``: keep it for reuse (or close it); False if the peer
        does not hold such a file."""
        closing = []
        with self._lock:
            file = self._held.pop(fd, None) if type(fd) is int else None
            if file is None:
                return False
            self._held_bytes -= file.capacity
            if self._closed:
                closing.append(file)
            else:
                self._idle[fd] = file
                while (len(self._idle) > _MAX_IDLE
                       or sum(f.capacity for f in self._idle.values()) > _MAX_IDLE_BYTES):
                    oldest = next(iter(self._idle))
                    closing.append(self._idle.pop(oldest))
        for each in closing:
            each.close()
        return True

    @property
    def outstanding(self) -> int:
        """Files the peer holds (mapped, not given back yet)."""
        return len(self._held)

    @property
    def files(self) -> int:
        """Files open on this side: held by the peer plus idle ones kept for reuse."""
        return len(self._held) + len(self._idle)

    def close(self) -> None:
        """Close every file (the connection is ending; the peer's mappings stay valid)."""
        with self._lock:
            self._closed = True
            files = [*self._held.values(), *self._idle.values()]
            self._held, self._idle, self._held_bytes = {}, {}, 0
        for file in files:
            file.close()


class ShmFrameError(ProtocolError):
    """A shared-memory frame whose file could not be mapped. The frame was read whole, so the
    stream is still in sync: ``peek`` is its message with every tensor left out (None), enough
    to fail the one request it answers."""

    def __init__(self, message: str, peek: Any = None) -> None:
        super().__init__(message)
        self.peek = peek


@dataclass(frozen=True)
class Mapped:
    """A peer's frame body mapped copy-on-write: tensors are views over ``buffer`` (a writable
    ctypes array over the mapping, unmapped when the last view of it is gone)."""

    buffer: Any
    size: int


# The mapping is made with libc's mmap through ctypes rather than Python's mmap.mmap, which
# keeps a duplicate of the file descriptor open for as long as the mapping lives (until Python
# 3.13's trackfd=False): a notebook holding a few thousand fetched results would run out of
# descriptors. This mapping holds none, and ctypes arrays export the buffer protocol that
# torch.frombuffer and numpy.frombuffer read.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


#: the sender's own mapping of a frame file: shared, its pages allocated at once
_SHARED_FLAGS = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)


def _map(fd: int, size: int, flags: int, error: type[Exception]) -> int:
    address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if address is None or address == _MAP_FAILED:
        code = ctypes.get_errno()
        raise error(code, f"cannot map a shared memory file: {os.strerror(code)}")
    return int(address)


def _map_private(fd: int, size: int) -> Any:
    try:
        address = _map(fd, size, _MAP_FLAGS, OSError)
    except OSError as exc:
        raise ProtocolError(f"cannot map the peer's shared memory file: {exc.strerror}"
                            ) from exc
    return (ctypes.c_char * size).from_address(address)


def _unmap_and_give_back(address: int, size: int, given_back: collections.deque[int],
                         fd: int, forks: int) -> None:
    _libc.munmap(address, size)
    if _forks[0] == forks:
        given_back.append(fd)
    # else a child forked while it was mapped may still read it: never given back, so the
    # peer never rewrites it (it closes it with the connection)


#: forks of this process so far (counted once a Receiver exists)
_forks = [0]
_forks_counted = threading.Lock()
_counting: list[bool] = []


def _count_forks() -> None:
    with _forks_counted:
        if not _counting:
            _counting.append(True)
            os.register_at_fork(after_in_parent=_forked)


def _forked() -> None:
    _forks[0] += 1


class Receiver:
    """Maps the frames a peer (process ``pid``) sent through shared memory.

    Each descriptor's fd is given back to the peer once it is no longer mapped here: at once
    when the file cannot be mapped, else when the mapping is freed (its last tensor is gone).
    :meth:`given_back` collects those fds; the owner sends them (``shm_release``) with its next
    frame — never from the finalizer itself, which may run inside a send holding its lock.
    """

    def __init__(self, pid: int, *, max_size: int) -> None:
        self.pid = pid
        self.max_size = max_size
        self._given_back: collections.deque[int] = collections.deque()
        _count_forks()

    @property
    def pending(self) -> bool:
        """Whether fds wait to be given back."""
        return bool(self._given_back)

    def given_back(self) -> list[int]:
        """The fds to release to the peer now (each returned once)."""
        fds = []
        while True:
            try:
                fds.append(self._given_back.popleft())
            except IndexError:
                return fds

    def map(self, descriptor: bytes | bytearray) -> Mapped:
        if len(descriptor) != DESCRIPTOR_SIZE:
            raise ProtocolError(f"a shared memory descriptor is {DESCRIPTOR_SIZE} bytes,"
                                f" got {len(descriptor)}")
        fd, reserved, size = _DESCRIPTOR.unpack(descriptor)
        if reserved != 0 or fd > _MAX_FD:
            raise ProtocolError("malformed shared memory descriptor")
        mapped = None
        try:
            if not 0 < size <= self.max_size:
                raise ProtocolError(f"a shared memory frame of {size} bytes exceeds the limit"
                                    f" of {self.max_size} bytes")
            opened = _open_peer_file(self.pid, fd)
            try:
                _check_sealed(opened, _FRAME_SEALS, size)
                buffer = _map_private(opened, size)
            finally:
                os.close(opened)
            mapped = Mapped(buffer, size)
            address = ctypes.addressof(buffer)
            weakref.finalize(buffer, _unmap_and_give_back, address, size, self._given_back, fd,
                             _forks[0])
        finally:
            if mapped is None:
                self._given_back.append(fd)
        return mapped
