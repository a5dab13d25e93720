"""One sealed message for a picklable object, its tensors' bytes carried beside the pickle.

Results travel from the workers to rank 0 as objects (envelopes holding fetched activations,
reducer states, ``ctx.state``). ``torch.save`` into memory wrote every tensor into a zip
archive (a copy, a CRC, the buffer regrown as it filled), the seal and the message framing
copied it again, and ``torch.load`` copied it back out: at tens of MB a fetch (capture-all:
~60 MB per call) spent more CPU there than in the transfer. Here the object is pickled with
each plain CPU tensor replaced by a reference, and the tensors' bytes are laid out after the
pickle in the one message, written once and read once.

Layout: ``seal (32) | pickle length (8, little endian) | pickle | tensors, each at a 64-byte
boundary``. The seal (``sharding.sealing``) covers everything after it, tensor bytes
included, so nothing is unpickled — and no tensor accepted — unless a rank of the group sent
it. Tensors that are not plain, dense, contiguous CPU tensors without autograd (a view with
strides, a Parameter, a sparse or conjugated tensor) are pickled as before, whole.
"""

from __future__ import annotations

import hmac
import io
import pickle
from typing import Any

import cloudpickle
import torch

from cloche.errors import ProtocolError
from cloche.sharding.sealing import MAC_BYTES, mac

__all__ = ["frame", "unframe"]

_ALIGN = 64
_LENGTH = 8


def _plain(obj: Any) -> bool:
    return (type(obj) is torch.Tensor and obj.layout == torch.strided
            and obj.device.type == "cpu" and not obj.requires_grad and obj.is_contiguous()
            and not obj.is_conj() and not obj.is_neg() and not obj.is_quantized)


class _Pickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}  # one tensor referenced twice travels once

    def persistent_id(self, obj: Any) -> Any:
        if not _plain(obj):
            return None
        index = self._index.get(id(obj))
        if index is None:
            index = self._index[id(obj)] = len(self.tensors)
            self.tensors.append(obj)
        return index


class _CloudPickler(cloudpickle.Pickler):
    """:class:`_Pickler` for values that carry code (commands: probe functions by value)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors: list[torch.Tensor] = []
        self._index: dict[int, int] = {}

    persistent_id = _Pickler.persistent_id


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, tensors: list[torch.Tensor]) -> None:
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid: Any) -> Any:
        return self.tensors[pid]


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.reshape(-1)
    if flat.numel() and flat.stride(-1) != 1:  # a one-element view keeps any stride
        flat = flat.clone(memory_format=torch.contiguous_format)  # (is_contiguous() says yes)
    return flat.view(torch.uint8)


def frame(key: bytes, name: str, value: Any, *, code: bool = False) -> torch.Tensor:
    """``value`` as one sealed uint8 message (raises what pickling raises); ``code``: pickled
    with cloudpickle, so functions defined in a notebook or a closure travel by value."""
    buffer = io.BytesIO()
    pickler: _Pickler | _CloudPickler = _CloudPickler(buffer) if code else _Pickler(buffer)
    pickler.dump(value)
    table = pickle.dumps([(str(t.dtype).removeprefix("torch."), tuple(t.shape))
                          for t in pickler.tensors], protocol=pickle.HIGHEST_PROTOCOL)
    skeleton = buffer.getbuffer()
    parts: list[bytes | memoryview] = [len(table).to_bytes(_LENGTH, "little"),
                                       len(skeleton).to_bytes(_LENGTH, "little"), table, skeleton]
    end = _aligned(MAC_BYTES + sum(len(p) for p in parts))
    offsets = []
    for t in pickler.tensors:
        offsets.append(end)
        end = _aligned(end + t.numel() * t.element_size())
    message = torch.empty(end, dtype=torch.uint8)  # every byte is written below
    view = message.numpy()
    at = MAC_BYTES
    for part in parts:
        view[at:at + len(part)] = memoryview(part).cast("B")
        at += len(part)
    del parts, skeleton  # the buffer's view must go before the buffer does
    for t, offset in zip(pickler.tensors, offsets, strict=True):
        view[at:offset] = 0  # the padding before each tensor
        at = offset + t.numel() * t.element_size()
        if t.numel():
            message[offset:at].copy_(_bytes_of(t))
    view[at:] = 0
    view[:MAC_BYTES] = memoryview(mac(key, name, view.data[MAC_BYTES:]))
    return message


def unframe(key: bytes, name: str, message: torch.Tensor) -> Any:
    """The object of a message from :func:`frame`; ProtocolError unless its seal verifies."""
    data = message.numpy().data
    if len(data) < MAC_BYTES + 2 * _LENGTH or \
            not hmac.compare_digest(data[:MAC_BYTES], mac(key, name, data[MAC_BYTES:])):
        raise ProtocolError(f"refused {name!r}: it is not sealed with this group's control key"
                            " (a stranger's write, or ranks started with different tokens)")
    at = MAC_BYTES
    table_len = int.from_bytes(data[at:at + _LENGTH], "little")
    skeleton_len = int.from_bytes(data[at + _LENGTH:at + 2 * _LENGTH], "little")
    at += 2 * _LENGTH
    table = pickle.loads(data[at:at + table_len])
    skeleton = data[at + table_len:at + table_len + skeleton_len]
    at = _aligned(at + table_len + skeleton_len)
    tensors = []
    for dtype_name, shape in table:
        dtype = getattr(torch, dtype_name)
        n = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        # a view into the message, not a copy (one reply's tensors are kept or dropped together)
        raw = message[at:at + n]
        tensors.append(raw.view(dtype).reshape(shape) if n else torch.empty(shape, dtype=dtype))
        at = _aligned(at + n)
    return _Unpickler(io.BytesIO(skeleton), tensors).load()
