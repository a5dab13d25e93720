"""Authenticating the control plane between ranks: nothing is unpickled unless rank 0 sealed it.

Ranks exchange pickled objects (commands, light requests, results) over the control store and
the gloo object group; both are plain TCP that anyone who reaches the port can write to. Every
such payload is therefore *sealed*: an HMAC-SHA256 over the name it travels under and its
bytes, keyed by the group's control key, which never travels. A payload whose seal does not
verify is refused before unpickling (:class:`~cloche.errors.ProtocolError`).

The control key also hides where the group keeps its keys: every rank works under a store
prefix derived from it, so a stranger who reaches the store cannot even find the keys to write
to (and so cannot stall a rank by writing garbage where it waits).

Where the key comes from: a local launch draws a random one and hands it to its worker
processes; under torchrun every node derives it from the server token
(:func:`key_from_token`), which the nodes share anyway.
"""

from __future__ import annotations

import hashlib
import hmac

from cloche.errors import ProtocolError

__all__ = ["MAC_BYTES", "key_from_token", "mac", "open_sealed", "seal", "store_prefix"]

MAC_BYTES = 32


def key_from_token(token: str) -> bytes:
    """The control key of a group whose nodes share ``token`` (the clients' token)."""
    return hmac.new(token.encode(), b"cloche control plane v1", hashlib.sha256).digest()


def store_prefix(key: bytes) -> str:
    """The store prefix the group works under: unguessable without the key."""
    return hmac.new(key, b"cloche store prefix", hashlib.sha256).hexdigest()[:32]


def mac(key: bytes, name: str, payload: bytes | memoryview) -> bytes:
    """The seal of ``payload`` under ``name`` (fed in pieces: a large payload is not copied)."""
    digest = hmac.new(key, name.encode() + b"\0", hashlib.sha256)
    digest.update(payload)
    return digest.digest()


def seal(key: bytes, name: str, payload: bytes) -> bytes:
    """``payload`` with its seal in front, bound to the ``name`` it travels under."""
    return mac(key, name, payload) + payload


def open_sealed(key: bytes, name: str, data: bytes | memoryview) -> memoryview:
    """The payload of ``data`` if its seal verifies for ``name``; ProtocolError otherwise.

    The payload is a view into ``data`` (objects of tens of MB are not copied to be checked).
    """
    view = memoryview(data).cast("B")
    seal_bytes, payload = view[:MAC_BYTES], view[MAC_BYTES:]
    if len(seal_bytes) != MAC_BYTES or \
            not hmac.compare_digest(seal_bytes, mac(key, name, payload)):
        raise ProtocolError(f"refused {name!r}: it is not sealed with this group's control key"
                            " (a stranger's write, or ranks started with different tokens)")
    return payload
