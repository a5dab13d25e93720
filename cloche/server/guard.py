"""Who may start a handshake: caps on half-open connections, backoff after wrong tokens.

Before a peer has authenticated, all it costs the server is a connection slot and a thread, so
without limits one address trickling hundreds of half-open handshakes fills every slot and
locks everyone else out. The guard is asked at ``accept`` time, before any byte is read:

- at most ``per_address`` unauthenticated connections per peer address and ``total`` in all
  (an authenticated connection no longer counts: the caps bound strangers, not users). When
  all ``total`` slots are taken, a newcomer evicts the oldest half-open connection of the
  address that holds the most, if that address would still hold more than the newcomer's: so
  a flood from a few addresses shrinks to a fair share, and a new address always gets in;
- after ``failure_limit`` wrong proofs from an address, that address is refused for
  ``backoff`` seconds, doubling with every further failure up to ``backoff_max``. The record is
  forgotten once the address has been quiet for ``forget_after``; a success does not reset it
  (otherwise a legitimate user behind the same NAT would hand an attacker fresh guesses).

Addresses are keyed per host for IPv4 and per /64 for IPv6 (one host usually owns a whole /64).
Refusing costs no handshake work, no HMAC, no thread. Pure bookkeeping behind one lock; the
caller does the socket work.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["AdmissionGuard", "Refusal", "address_key"]

_MAX_RECORDS = 65536


def address_key(host: str) -> str:
    """The unit that caps and backoff apply to: the IPv4 address, or the IPv6 /64."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


@dataclass(frozen=True)
class Refusal:
    """Why a connection is turned away at accept time; ``code`` travels in ``refused``."""

    code: str  # "busy" (a cap is reached) or "backoff" (too many wrong tokens)
    reason: str


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0
    blocked_until: float = 0.0


class AdmissionGuard:
    """Counts unauthenticated connections and failed authentications per peer address.

    Each admitted connection is a *ticket* (any object; the server passes the connection): it
    is released with :meth:`release`, and evicted by calling its ``evict()`` method, if it has
    one, outside the guard's lock.
    """

    def __init__(self, *, per_address: int, total: int, failure_limit: int, backoff: float,
                 backoff_max: float, forget_after: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._per_address = per_address
        self._total = total
        self._failure_limit = failure_limit
        self._backoff = backoff
        self._backoff_max = backoff_max
        self._forget_after = max(forget_after, backoff_max)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, deque[Any]] = {}  # address -> its tickets, oldest first
        self._where: dict[int, str] = {}  # id(ticket) -> address
        self._pending_total = 0
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        #: connections turned away because a cap was reached / the address was backing off,
        #: and half-open connections evicted to make room for a newcomer
        self.refused_busy = 0
        self.refused_backoff = 0
        self.evicted = 0

    # ------------------------------------------------------------------ admission
    def admit(self, host: str, ticket: Any) -> Refusal | None:
        """Count ``ticket``, a new unauthenticated connection from ``host``, or say why not."""
        key = address_key(host)
        victim = None
        with self._lock:
            now = self._clock()
            record = self._failures.get(key)
            if record is not None and now < record.blocked_until:
                self.refused_backoff += 1
                wait = record.blocked_until - now
                return Refusal("backoff", f"too many failed authentications from {host}; "
                                          f"try again in {wait:.0f} s")
            mine = len(self._pending.get(key, ()))
            if mine >= self._per_address:
                self.refused_busy += 1
                return Refusal("busy", f"too many unauthenticated connections from {host}")
            if self._pending_total >= self._total:
                crowded = max(self._pending, key=lambda k: len(self._pending[k]))
                if len(self._pending[crowded]) <= mine + 1:  # no address holds more than its share
                    self.refused_busy += 1
                    return Refusal("busy", "too many unauthenticated connections")
                victim = self._pending[crowded][0]
                self._forget(victim)
                self.evicted += 1
            self._pending.setdefault(key, deque()).append(ticket)
            self._where[id(ticket)] = key
            self._pending_total += 1
        if victim is not None and hasattr(victim, "evict"):
            victim.evict()
        return None

    def release(self, ticket: Any) -> None:
        """The connection of ``ticket`` authenticated, failed or went away (idempotent)."""
        with self._lock:
            self._forget(ticket)

    def _forget(self, ticket: Any) -> None:
        key = self._where.pop(id(ticket), None)
        if key is None:
            return
        tickets = self._pending[key]
        tickets.remove(ticket)
        if not tickets:
            del self._pending[key]
        self._pending_total -= 1

    def failed(self, host: str) -> bool:
        """``host`` sent a wrong proof: count it; True when the address is now blocked."""
        key = address_key(host)
        with self._lock:
            now = self._clock()
            record = self._failures.pop(key, None)
            if record is None or now - record.last > self._forget_after:
                record = _Failures()
            record.count += 1
            record.last = now
            over = record.count - self._failure_limit
            if over >= 0:
                record.blocked_until = now + min(self._backoff * 2.0 ** min(over, 62),
                                                 self._backoff_max)
            self._failures[key] = record  # most recent last
            self._trim(now)
            return over >= 0

    def _trim(self, now: float) -> None:
        while self._failures:
            key, oldest = next(iter(self._failures.items()))
            if now - oldest.last <= self._forget_after and len(self._failures) <= _MAX_RECORDS:
                return
            del self._failures[key]

    # ------------------------------------------------------------------ introspection
    def pending(self, host: str) -> int:
        with self._lock:
            return len(self._pending.get(address_key(host), ()))

    @property
    def pending_total(self) -> int:
        with self._lock:
            return self._pending_total

    def failures(self, host: str) -> int:
        with self._lock:
            record = self._failures.get(address_key(host))
            return 0 if record is None else record.count
