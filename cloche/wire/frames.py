"""Frame layout: the fixed preamble in front of every cloche message.

A frame is ``preamble | header | body``. The preamble says how long the two other parts are, so
a reader knows exactly how many bytes to read, and — because the sizes arrive before anything
else — can refuse an oversize frame *before* allocating memory for it (the weak spot of naive
length-prefixed protocols is a peer announcing 2**63 bytes).

Byte layout (all integers big-endian)::

    offset  size  field
    0       4     magic  b"CLCH"
    4       1     protocol version (2)
    5       1     flags: 0, or FLAG_SHM (0x01) once shared memory was negotiated
    6       2     reserved (0)
    8       4     header length (u32)
    12      4     body length (u32); 0xFFFFFFFF is an escape: the real length follows as a u64
    16      8     (only after the escape) body length (u64)

Pure functions over bytes; no I/O here (see :mod:`cloche.wire.transport`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from cloche.errors import FrameTooLarge, ProtocolError, VersionMismatch

__all__ = [
    "EXTENDED_SIZE",
    "FLAG_SHM",
    "MAGIC",
    "PREAMBLE_SIZE",
    "PROTOCOL_VERSION",
    "Limits",
    "Preamble",
    "encode_preamble",
    "parse_extended",
    "parse_preamble",
]

MAGIC = b"CLCH"
#: 2: the hello and the welcome carry the peers' versions, a refusal carries a code
PROTOCOL_VERSION = 2
PREAMBLE_SIZE = 16
#: the body is a shared memory descriptor (``cloche.wire.shm``), not the buffers themselves
FLAG_SHM = 0x01
EXTENDED_SIZE = 8
_ESCAPE = 0xFFFFFFFF
_FIXED = struct.Struct(">4sBBHII")
_TLS_RECORDS = (0x15, 0x16)  # alert, handshake: the first byte of what a TLS peer sends
_U64 = struct.Struct(">Q")


@dataclass(frozen=True, kw_only=True)
class Limits:
    """Largest header and body a reader accepts; checked before any allocation.

    Before authentication the server uses :meth:`handshake` (tiny header, no body at all).
    """

    max_header: int = 64 * 1024 * 1024
    max_body: int = 1 << 40

    @classmethod
    def handshake(cls) -> Limits:
        return cls(max_header=4096, max_body=0)

    def check(self, header_len: int, body_len: int) -> None:
        if header_len > self.max_header:
            raise FrameTooLarge(
                f"frame header of {header_len} bytes exceeds the limit of {self.max_header} bytes"
            )
        if body_len > self.max_body:
            raise FrameTooLarge(
                f"frame body of {body_len} bytes exceeds the limit of {self.max_body} bytes"
            )


@dataclass(frozen=True)
class Preamble:
    """The parsed fixed part. ``extended`` means 8 more bytes carry the body length."""

    header_len: int
    body_len: int
    extended: bool
    flags: int = 0


def encode_preamble(header_len: int, body_len: int, flags: int = 0) -> bytes:
    """The preamble (16 or 24 bytes) for a frame with these part sizes (and ``flags``)."""
    if not 0 <= header_len < _ESCAPE:
        raise ProtocolError(f"header length {header_len} cannot be framed")
    if body_len < 0 or body_len >= 1 << 64:
        raise ProtocolError(f"body length {body_len} cannot be framed")
    if body_len >= _ESCAPE:
        return _FIXED.pack(MAGIC, PROTOCOL_VERSION, flags, 0, header_len, _ESCAPE) + _U64.pack(
            body_len
        )
    return _FIXED.pack(MAGIC, PROTOCOL_VERSION, flags, 0, header_len, body_len)


def parse_preamble(data: bytes | bytearray | memoryview, limits: Limits | None = None, *,
                   allowed_flags: int = 0) -> Preamble:
    """Parse the 16 fixed bytes; raises ProtocolError for anything that is not a cloche frame.

    When the body length is escaped, ``body_len`` is -1 until :func:`parse_extended` is called.
    ``allowed_flags``: the flag bits this connection negotiated (any other set bit is an error).
    """
    if len(data) != PREAMBLE_SIZE:
        raise ProtocolError(f"a frame preamble is {PREAMBLE_SIZE} bytes, got {len(data)}")
    magic, version, flags, reserved, header_len, body_len = _FIXED.unpack(data)
    if magic != MAGIC:
        if magic[0] in _TLS_RECORDS and magic[1] == 3:
            raise ProtocolError(
                "this is TLS, not a cloche frame: the peer speaks TLS and this connection does"
                " not (a client connects with tls=...; a server needs --tls-cert)")
        raise ProtocolError(f"not a cloche frame (magic {bytes(magic)!r}, expected {MAGIC!r})")
    if version != PROTOCOL_VERSION:
        raise VersionMismatch(
            f"the peer speaks cloche protocol version {version}, this side speaks"
            f" {PROTOCOL_VERSION}: install the same cloche release on both sides",
            received=version, speaks=PROTOCOL_VERSION)
    if flags & ~allowed_flags or reserved != 0:
        raise ProtocolError(f"reserved preamble bits are set (flags={flags}, reserved={reserved})")
    if header_len == 0:
        raise ProtocolError("frame has an empty header")
    extended = body_len == _ESCAPE
    if limits is not None:
        limits.check(header_len, 0 if extended else body_len)
    return Preamble(header_len, -1 if extended else body_len, extended, flags)


def parse_extended(
    preamble: Preamble, data: bytes | bytearray | memoryview, limits: Limits | None = None
) -> Preamble:
    """Complete an escaped preamble with its 8-byte body length."""
    if len(data) != EXTENDED_SIZE:
        raise ProtocolError(f"an extended body length is {EXTENDED_SIZE} bytes, got {len(data)}")
    (body_len,) = _U64.unpack(data)
    if body_len < _ESCAPE:
        raise ProtocolError(f"extended body length {body_len} should have used the short form")
    if limits is not None:
        limits.check(preamble.header_len, body_len)
    return Preamble(preamble.header_len, body_len, True, preamble.flags)
