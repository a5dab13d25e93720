"""Strangers cannot lock others out before authenticating: one deadline for the whole handshake,
caps on half-open connections per peer address and in total, and backoff after wrong tokens.

127.0.0.2 plays the attacker's address (all of 127.0.0.0/8 is loopback on Linux), 127.0.0.1
the legitimate client's.
"""

from __future__ import annotations

import contextlib
import select
import socket

import cloche
import pytest
import torch
from cloche.client import connect
from cloche.errors import AuthError
from cloche.server.guard import AdmissionGuard, address_key
from cloche.wire.handshake import ClientHandshake

from tests.server.helpers import InProcessServer, authenticated, frame, raw_socket, wait_for

torch.set_num_threads(1)

ATTACKER = "127.0.0.2"


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir)


def test_a_trickled_handshake_is_cut_off_at_one_deadline_for_the_whole_exchange(local_model):
    # One byte every 0.2 s never trips a per-recv timeout of 1.5 s; only a deadline for the
    # whole exchange stops it. The hello is ~70 bytes: trickled whole, it would take ~14 s.
    with InProcessServer(local_model, handshake_timeout=1.5) as server:
        hello = frame(ClientHandshake(server.token).start())
        sock = raw_socket(server.address, timeout=30)
        sent, answer = 0, None
        try:
            for byte in hello:
                sock.sendall(bytes([byte]))
                sent += 1
                readable, _, _ = select.select([sock], [], [], 0.2)  # the trickle's pace
                if readable:
                    answer = sock.recv(4096)
                    break
        except OSError:
            answer = b""  # reset by the server: cut off as well
        finally:
            sock.close()
        assert answer == b"", f"the server answered {answer!r} after {sent} trickled bytes"
        assert sent < len(hello), "the whole hello got through a trickle"
        with connect(server.address, token=server.token) as model:
            assert model.ping("after") == "after"


def stalled(address: str, source: str, count: int) -> list[socket.socket]:
    """``count`` half-open handshakes from ``source``: one byte of a hello, then nothing."""
    socks = []
    for _ in range(count):
        sock = raw_socket(address, timeout=30, source=source)
        with contextlib.suppress(OSError):
            sock.sendall(b"C")
        socks.append(sock)
    return socks


def test_half_open_connections_from_one_address_do_not_lock_out_another(local_model):
    with InProcessServer(local_model, max_connections=32) as server:
        attackers = stalled(server.address, ATTACKER, 48)
        try:
            with connect(server.address, token=server.token, timeout=30) as model:
                assert model.ping("got in") == "got in"
        finally:
            for sock in attackers:
                sock.close()


def test_unauthenticated_connections_are_capped_per_address_and_in_total(local_model):
    with InProcessServer(local_model, max_unauthenticated_per_address=3,
                         max_unauthenticated=8) as server:
        guard = server.server.guard
        socks = []
        try:
            for i in range(2, 6):  # four addresses, five half-open connections each
                socks += stalled(server.address, f"127.0.0.{i}", 5)
            # 20 connections, 8 slots: every address ends with its fair share, the others were
            # refused or (when a newcomer needed the slot) evicted
            assert wait_for(lambda: guard.refused_busy + guard.evicted == 12)
            assert guard.pending_total == 8
            assert sorted(guard.pending(f"127.0.0.{i}") for i in range(2, 6)) == [2, 2, 2, 2]
        finally:
            for sock in socks:
                sock.close()
        assert wait_for(lambda: guard.pending_total == 0)
        with connect(server.address, token=server.token) as model:
            assert model.ping(1) == 1


def test_a_flood_from_several_addresses_does_not_keep_a_new_address_out(local_model):
    with InProcessServer(local_model, max_unauthenticated_per_address=4,
                         max_unauthenticated=8) as server:
        guard = server.server.guard
        flood = stalled(server.address, "127.0.0.2", 4) + stalled(server.address, "127.0.0.3", 4)
        try:
            assert wait_for(lambda: guard.pending_total == 8)  # every slot taken
            with connect(server.address, token=server.token, timeout=30) as model:
                assert model.ping("got in") == "got in"
            assert guard.evicted == 1
        finally:
            for sock in flood:
                sock.close()


def test_wrong_tokens_from_one_address_back_it_off_without_slowing_another(local_model):
    with InProcessServer(local_model, auth_failure_limit=3, auth_backoff=600.0) as server:
        for _ in range(3):
            with pytest.raises(AuthError, match="authentication failed"):
                authenticated(server.address, "a wrong guess of the token", source=ATTACKER)
        # the address now waits (10 minutes here), whatever it sends, the right token included
        with pytest.raises(AuthError, match="too many failed authentications"):
            authenticated(server.address, server.token, source=ATTACKER)
        assert server.server.guard.failures(ATTACKER) == 3
        assert server.server.guard.refused_backoff == 1
        # another address is not slowed down at all
        authenticated(server.address, server.token, source="127.0.0.1").close()
        with connect(server.address, token=server.token) as model:
            assert model.ping("still in") == "still in"


def test_backoff_doubles_is_capped_and_is_forgotten():
    now = [0.0]
    guard = AdmissionGuard(per_address=8, total=64, failure_limit=2, backoff=1.0,
                           backoff_max=4.0, forget_after=100.0, clock=lambda: now[0])
    assert not guard.failed("10.0.0.1")
    assert guard.failed("10.0.0.1")  # the limit: blocked for 1 s
    assert guard.admit("10.0.0.1", object()) is not None
    assert guard.admit("10.0.0.2", object()) is None
    now[0] = 1.5
    ticket = object()
    assert guard.admit("10.0.0.1", ticket) is None
    guard.release(ticket)
    guard.failed("10.0.0.1")  # 2 s
    now[0] = 3.0
    assert guard.admit("10.0.0.1", object()) is not None
    for _ in range(10):
        guard.failed("10.0.0.1")
    now[0] += 4.01  # capped at 4 s
    assert guard.admit("10.0.0.1", object()) is None
    now[0] += 200  # quiet for long enough: a fresh record
    guard.failed("10.0.0.1")
    assert guard.failures("10.0.0.1") == 1
    # IPv6 peers count per /64; IPv4-mapped IPv6 as the IPv4 address
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff") != address_key("2001:db9::1")
    assert address_key("::ffff:10.0.0.1") == "10.0.0.1"
