"""The cloche wire protocol: frames, codec, handshake (pure) and a thin socket transport.

See ``docs/protocol.md`` for the byte layout.
"""

from cloche.wire.codec import decode, decode_header, encode
from cloche.wire.frames import PROTOCOL_VERSION, Limits

__all__ = ["PROTOCOL_VERSION", "Limits", "decode", "decode_header", "encode"]
