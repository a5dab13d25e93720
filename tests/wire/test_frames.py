"""Frame preambles: layout, escape for big bodies, limits checked before allocation."""

from __future__ import annotations

import struct

import pytest
from cloche.errors import FrameTooLarge, ProtocolError, VersionMismatch
from cloche.wire import frames
from hypothesis import given, settings
from hypothesis import strategies as st


def test_short_preamble_layout():
    raw = frames.encode_preamble(10, 20)
    assert raw == b"CLCH" + bytes([frames.PROTOCOL_VERSION, 0, 0, 0]) + struct.pack(">II", 10, 20)
    assert frames.parse_preamble(raw) == frames.Preamble(10, 20, False)


def test_big_bodies_use_the_escape():
    size = 5 * 2**30
    raw = frames.encode_preamble(7, size)
    assert len(raw) == frames.PREAMBLE_SIZE + frames.EXTENDED_SIZE
    first = frames.parse_preamble(raw[: frames.PREAMBLE_SIZE])
    assert first.extended and first.body_len == -1
    assert frames.parse_extended(first, raw[frames.PREAMBLE_SIZE :]).body_len == size


def test_limits_are_checked_from_the_preamble_alone():
    limits = frames.Limits(max_header=100, max_body=1000)
    with pytest.raises(FrameTooLarge, match="header of 101 bytes"):
        frames.parse_preamble(frames.encode_preamble(101, 0), limits)
    with pytest.raises(FrameTooLarge, match="body of 1001 bytes"):
        frames.parse_preamble(frames.encode_preamble(1, 1001), limits)
    raw = frames.encode_preamble(1, 2**40)
    first = frames.parse_preamble(raw[:16], limits)
    with pytest.raises(FrameTooLarge):
        frames.parse_extended(first, raw[16:], limits)
    assert issubclass(FrameTooLarge, ProtocolError)


V = frames.PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"HTTP" + bytes(12), "not a cloche frame"),
        (b"CLCH" + bytes([V + 1, 0, 0, 0]) + struct.pack(">II", 1, 0), f"version {V + 1}"),
        (b"CLCH" + bytes([V, 1, 0, 0]) + struct.pack(">II", 1, 0), "reserved"),
        (b"CLCH" + bytes([V, 0, 0, 0]) + struct.pack(">II", 0, 0), "empty header"),
        (b"CLCH", "16 bytes"),
    ],
)
def test_bad_preambles(raw, message):
    with pytest.raises(ProtocolError, match=message):
        frames.parse_preamble(raw)


def test_extended_length_must_need_the_escape():
    first = frames.parse_preamble(b"CLCH" + bytes([V, 0, 0, 0]) + struct.pack(">II", 1, 2**32 - 1))
    with pytest.raises(ProtocolError, match="short form"):
        frames.parse_extended(first, struct.pack(">Q", 5))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=16, max_size=16))
def test_random_preambles_only_raise_protocol_errors(raw):
    try:
        frames.parse_preamble(raw, frames.Limits.handshake())
    except ProtocolError:
        pass


@pytest.mark.parametrize("first", [b"\x16\x03\x01\x02\x00", b"\x15\x03\x03\x00\x02"])
def test_tls_bytes_on_a_plain_connection_say_so(first):
    with pytest.raises(ProtocolError, match="TLS"):
        frames.parse_preamble(first + bytes(11))


def test_another_version_is_a_version_mismatch_naming_both():
    raw = frames.encode_preamble(1, 0)
    with pytest.raises(VersionMismatch, match=f"version 7.*speaks {frames.PROTOCOL_VERSION}"):
        frames.parse_preamble(raw[:4] + bytes([7]) + raw[5:])
