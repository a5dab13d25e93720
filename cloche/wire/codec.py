"""The message codec: a msgpack header plus raw tensor buffers.

A message is any tree of plain values (None, bool, int, float, str, bytes, list, dict) with
tensors and arrays anywhere inside it. :func:`encode` packs the tree into one small msgpack
*header*; every tensor/array in it is replaced by a reference (dtype, shape, buffer index) and its
bytes travel after the header as a raw *buffer* — never pickled, never base64'd. The receiver
allocates ``torch.empty(shape, dtype)`` for each reference while parsing the header and the
transport reads the bytes straight into it (``recv_into``: zero-copy).

Types msgpack lacks travel as msgpack extension types (codes in ``EXT_*``; documented in
``docs/protocol.md``). Anything that is not plain data — functions, user objects — is cloudpickled
into an explicitly marked ``EXT_PICKLE`` field (tensors inside it still travel as raw buffers via
pickle's persistent ids). Such a field is unpickled only when the caller passes
``allow_code=True``; the server passes it only after the peer has authenticated. The same flag
gates ``EXT_RECORD`` (dataclasses on the allow-list of ``wire.records``): before
authentication no record is built and no module is imported.

Every failure to decode raises :class:`~cloche.errors.ProtocolError` (never anything else), except
that a well-formed pickle which cannot be loaded (say a module missing on this side) raises
:class:`~cloche.errors.UsageError` from :meth:`PendingMessage.finish`, when the frame has been
consumed and the connection is still in sync. Pure functions over bytes; no I/O.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pickle
from typing import Any

import cloudpickle
import msgpack
import numpy as np
import torch

from cloche.errors import ClocheError, ProtocolError, UsageError
from cloche.wire.records import record_type, wire_name
from cloche.wire.shm import ALIGN as _SHM_ALIGN

__all__ = [
    "EXT_DTYPE",
    "EXT_ELLIPSIS",
    "EXT_NDARRAY",
    "EXT_NPSCALAR",
    "EXT_PICKLE",
    "EXT_RECORD",
    "EXT_SIZE",
    "EXT_SLICE",
    "EXT_TENSOR",
    "EXT_TUPLE",
    "TORCH_DTYPES",
    "Encoded",
    "PendingMessage",
    "decode",
    "decode_header",
    "encode",
    "peek_header",
]

EXT_TUPLE = 1
EXT_TENSOR = 2
EXT_NDARRAY = 3
EXT_NPSCALAR = 4
EXT_DTYPE = 5
EXT_SLICE = 6
EXT_ELLIPSIS = 7
EXT_SIZE = 8
EXT_RECORD = 9
EXT_PICKLE = 10

#: Tensor dtypes on the wire, by their wire name (``str(dtype)`` without ``torch.``).
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "bfloat16",
        "float32",
        "float64",
        "complex64",
        "complex128",
        "float8_e4m3fn",
        "float8_e5m2",
    )
    if hasattr(torch, name)
}
_TORCH_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
_NUMPY_DTYPES = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}
_MAX_DIMS = 64
#: dtypes whose tensors ``.numpy()`` views as arrays with a one-character buffer format: their
#: bytes are a memoryview of that view, with two tensor calls instead of five or six (each
#: torch call costs microseconds when the caches are cold, as they are right after a model ran)
_PLAIN_VIEW = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32,
                         torch.int64, torch.float16, torch.float32, torch.float64})
class Encoded:
    """An encoded message: the header bytes and the buffers that follow it, in order."""

    __slots__ = ("buffers", "header")

    def __init__(self, header: bytes, buffers: list[memoryview]) -> None:
        self.header = header
        self.buffers = buffers

    @property
    def body_len(self) -> int:
        return sum(buf.nbytes for buf in self.buffers)


def encode(message: Any) -> Encoded:
    """Encode a message tree; raises UsageError for values that cannot travel."""
    encoder = _Encoder()
    header = encoder.pack(message)
    return Encoded(header, encoder.buffers)


def decode_header(header: bytes | bytearray | memoryview, body_len: int, *,
                  allow_code: bool = False, mapped: Any = None) -> PendingMessage:
    """Parse a header; allocate (but do not fill) the buffers it references.

    ``body_len`` is the frame's body length: the references must account for exactly that many
    bytes, which is checked reference by reference *before* each allocation.

    ``mapped``: a writable buffer of ``body_len`` bytes (a shared memory frame's mapping, see
    :mod:`cloche.wire.shm`) holding the buffers at the offsets of :func:`shm.layout`: tensors
    and arrays are then views over it (no ``targets`` to fill), each checked to lie inside it.
    """
    decoder = _Decoder(body_len, allow_code, mapped)
    tree = decoder.unpack(bytes(header))
    if mapped is not None:
        if decoder.cursor != body_len:
            raise ProtocolError(f"a shared memory frame of {body_len} bytes holds buffers that"
                                f" end at {decoder.cursor}")
    elif decoder.remaining:
        raise ProtocolError(
            f"frame body has {decoder.remaining} bytes that no buffer reference accounts for"
        )
    return PendingMessage(tree, decoder.targets, decoder.deferred)


def peek_header(header: bytes | bytearray | memoryview) -> Any:
    """A header's message with every tensor, array and pickled field left out (None).

    For a frame whose buffers cannot be had (a shared memory file that did not open): enough
    to learn which request it answers. Raises ProtocolError for a malformed header.
    """
    decoder = _Decoder(0, False, _PEEK)
    return decoder.unpack(bytes(header))


def decode(header: bytes | bytearray | memoryview, body: bytes | bytearray | memoryview, *,
           allow_code: bool = False) -> Any:
    """Decode a complete frame held in memory (tests, and small frames)."""
    body = memoryview(body).cast("B")
    pending = decode_header(header, body.nbytes, allow_code=allow_code)
    offset = 0
    for target in pending.targets:
        size = target.nbytes
        target[:] = body[offset : offset + size]
        offset += size
    return pending.finish()


class PendingMessage:
    """A decoded header whose buffers still have to be filled.

    Fill every memoryview in ``targets`` completely, in order, from the frame body, then call
    :meth:`finish` for the message. :meth:`peek` gives the tree before pickled fields are loaded
    (to learn a request id even when loading its code fails).
    """

    def __init__(self, tree: Any, targets: list[memoryview], deferred: int) -> None:
        self.targets = targets
        self._tree = tree
        self._deferred = deferred

    def peek(self) -> Any:
        return self._tree

    def finish(self) -> Any:
        if not self._deferred:
            return self._tree
        return _resolve(self._tree)


# ---------------------------------------------------------------------------------- encoding


class _Encoder:
    def __init__(self) -> None:
        self.buffers: list[memoryview] = []

    def pack(self, obj: Any) -> bytes:
        try:
            return msgpack.packb(obj, default=self._default, use_bin_type=True, strict_types=True)
        except ClocheError:
            raise
        except Exception as exc:  # msgpack raises TypeError/ValueError/OverflowError
            raise UsageError(f"cannot encode a {type(obj).__name__} for the wire: {exc}") from exc

    def _default(self, obj: Any) -> msgpack.ExtType:
        kind = type(obj)
        if kind is tuple:
            return msgpack.ExtType(EXT_TUPLE, self.pack(list(obj)))
        if kind is torch.Size:
            return msgpack.ExtType(EXT_SIZE, self.pack(list(obj)))
        if isinstance(obj, torch.Tensor):
            if obj.layout != torch.strided:
                raise UsageError(f"{obj.layout} tensors cannot travel; send .to_dense()")
            return self.tensor(obj)
        if kind is np.ndarray and obj.dtype.name in _NUMPY_DTYPES:
            return self.ndarray(obj)
        if isinstance(obj, np.generic) and obj.dtype.name in _NUMPY_DTYPES:
            value = np.asarray(obj, dtype=_NUMPY_DTYPES[obj.dtype.name])
            return msgpack.ExtType(EXT_NPSCALAR, self.pack([obj.dtype.name, value.tobytes()]))
        if kind is torch.dtype and obj in _TORCH_NAMES:
            return msgpack.ExtType(EXT_DTYPE, _TORCH_NAMES[obj].encode())
        if kind is slice:
            return msgpack.ExtType(EXT_SLICE, self.pack([obj.start, obj.stop, obj.step]))
        if obj is Ellipsis:
            return msgpack.ExtType(EXT_ELLIPSIS, b"")
        path = wire_name(obj)
        if path is not None:
            fields = {name: getattr(obj, name) for name in _field_names(kind)}
            return msgpack.ExtType(EXT_RECORD, self.pack([path, fields]))
        return self.pickled(obj)

    def tensor(self, obj: torch.Tensor) -> msgpack.ExtType:
        if (type(obj) is torch.Tensor and obj.dtype in _PLAIN_VIEW and obj.is_cpu
                and not obj.requires_grad and obj.is_contiguous() and not obj.is_neg()
                and obj.numel()):  # (a real dtype has no conjugate bit)
            buf = obj.numpy().data.cast("B")
            index = len(self.buffers)
            self.buffers.append(buf)
            return msgpack.ExtType(EXT_TENSOR, self.pack([_TORCH_NAMES[obj.dtype],
                                                          list(obj.shape), index]))
        tensor = obj.detach()
        if tensor.device.type != "cpu":
            tensor = tensor.cpu()
        if tensor.is_conj():
            tensor = tensor.resolve_conj()
        if tensor.is_neg():
            tensor = tensor.resolve_neg()
        tensor = tensor.contiguous()
        name = _TORCH_NAMES.get(tensor.dtype)
        if name is None:
            raise UsageError(f"tensors of dtype {tensor.dtype} cannot travel on the wire")
        if tensor.numel() == 0:
            buf = memoryview(b"")
        else:
            flat = tensor.reshape(-1)
            if flat.stride(0) != 1:  # a one-element tensor can be "contiguous" with any stride
                flat = flat.clone(memory_format=torch.contiguous_format)
            buf = flat.view(torch.uint8).numpy().data
        index = len(self.buffers)
        self.buffers.append(buf)
        return msgpack.ExtType(EXT_TENSOR, self.pack([name, list(tensor.shape), index]))

    def ndarray(self, obj: np.ndarray) -> msgpack.ExtType:
        name = obj.dtype.name
        array = obj.astype(_NUMPY_DTYPES[name], order="C", copy=False)  # keeps 0-d arrays 0-d
        buf = array.reshape(-1).view(np.uint8).data if array.size else memoryview(b"")
        index = len(self.buffers)
        self.buffers.append(buf)
        return msgpack.ExtType(EXT_NDARRAY, self.pack([name, list(array.shape), index]))

    def pickled(self, obj: Any) -> msgpack.ExtType:
        stream = io.BytesIO()
        pickler = _BufferPickler(stream, self)
        try:
            pickler.dump(obj)
        except ClocheError:
            raise
        except Exception as exc:
            raise UsageError(f"cannot pickle a {type(obj).__name__} for the wire: {exc}") from exc
        return msgpack.ExtType(EXT_PICKLE, self.pack([stream.getvalue(), pickler.refs]))


_BUFFER_KINDS = frozenset({torch.Tensor, np.ndarray})


class _BufferPickler(cloudpickle.Pickler):
    """cloudpickle, except that tensors and arrays leave the pickle as raw buffers."""

    def __init__(self, stream: io.BytesIO, encoder: _Encoder) -> None:
        super().__init__(stream)
        self.encoder = encoder
        self.refs: list[msgpack.ExtType] = []
        self._memo: dict[int, tuple[int, Any]] = {}

    def persistent_id(self, obj: Any) -> int | None:
        kind = type(obj)
        if kind not in _BUFFER_KINDS:  # called for every object pickled: leave at once
            return None
        make: Any
        if kind is torch.Tensor and obj.layout == torch.strided and obj.dtype in _TORCH_NAMES:
            make = self.encoder.tensor
        elif kind is np.ndarray and obj.dtype.name in _NUMPY_DTYPES:
            make = self.encoder.ndarray
        else:
            return None
        seen = self._memo.get(id(obj))
        if seen is not None:
            return seen[0]
        self.refs.append(make(obj))
        pid = len(self.refs) - 1
        self._memo[id(obj)] = (pid, obj)  # keep obj alive so its id stays unique
        return pid


# ---------------------------------------------------------------------------------- decoding


class _Deferred:
    """A pickled field, loaded only after the buffers it references have been filled."""

    __slots__ = ("data", "refs")

    def __init__(self, data: bytes, refs: list[Any]) -> None:
        self.data = data
        self.refs = refs

    def load(self) -> Any:
        try:
            return _BufferUnpickler(io.BytesIO(self.data), self.refs).load()
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"shipped code refers to module {exc.name!r}, which cannot be imported here."
                f" Install it where this side runs, or ship it by value from the sender:"
                f" cloudpickle.register_pickle_by_value({exc.name}) (a cloche client does this"
                f" by itself for modules outside site-packages and the standard library, unless"
                f" cloche.client.ship_by_reference named them)") from exc
        except Exception as exc:
            raise UsageError(
                f"shipped code or object could not be loaded here: {type(exc).__name__}: {exc}"
            ) from exc


class _BufferUnpickler(pickle.Unpickler):
    def __init__(self, stream: io.BytesIO, refs: list[Any]) -> None:
        super().__init__(stream)
        self.refs = refs

    def persistent_load(self, pid: Any) -> Any:
        if type(pid) is not int or not 0 <= pid < len(self.refs):
            raise pickle.UnpicklingError(f"bad buffer reference {pid!r} in a pickle")
        return self.refs[pid]


#: ``_Decoder``'s ``mapped`` when it only peeks at a header (see :func:`peek_header`)
_PEEK: Any = object()


class _Decoder:
    def __init__(self, body_len: int, allow_code: bool, mapped: Any = None) -> None:
        if body_len < 0:
            raise ProtocolError(f"negative body length {body_len}")
        self.remaining = body_len
        self.allow_code = allow_code
        self.targets: list[memoryview] = []
        self.deferred = 0
        self.mapped = mapped  # a shared memory frame's mapping, or _PEEK, or None
        self.cursor = 0  # where the last mapped buffer ends
        self.count = 0  # buffer references seen (mapped frames)

    def unpack(self, data: bytes) -> Any:
        try:
            return msgpack.unpackb(
                data, ext_hook=self.ext_hook, raw=False, strict_map_key=False, use_list=True
            )
        except ClocheError:
            raise
        except Exception as exc:  # msgpack's errors, unhashable keys, recursion...
            raise ProtocolError(f"malformed message header: {type(exc).__name__}: {exc}") from exc

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == EXT_TUPLE:
            return tuple(self._list(data, None, "tuple"))
        if code == EXT_SIZE:
            dims = self._list(data, None, "torch.Size")
            if not all(type(d) is int for d in dims):
                raise ProtocolError("torch.Size holds a non-integer")
            return torch.Size(dims)
        if code == EXT_TENSOR:
            return self._buffer(data, tensor=True)
        if code == EXT_NDARRAY:
            return self._buffer(data, tensor=False)
        if code == EXT_NPSCALAR:
            name, raw = self._list(data, 2, "numpy scalar")
            np_dtype = _NUMPY_DTYPES.get(name) if isinstance(name, str) else None
            if np_dtype is None or type(raw) is not bytes or len(raw) != np_dtype.itemsize:
                raise ProtocolError("malformed numpy scalar")
            return np.frombuffer(raw, dtype=np_dtype)[0].astype(np.dtype(name))
        if code == EXT_DTYPE:
            torch_dtype = TORCH_DTYPES.get(data.decode("ascii", "replace"))
            if torch_dtype is None:
                raise ProtocolError(f"unknown dtype {data[:40]!r}")
            return torch_dtype
        if code == EXT_SLICE:
            start, stop, step = self._list(data, 3, "slice")
            return slice(start, stop, step)
        if code == EXT_ELLIPSIS:
            return Ellipsis
        if code == EXT_RECORD:
            return self._record(data)
        if code == EXT_PICKLE:
            raw, refs = self._list(data, 2, "pickled field")
            if type(raw) is not bytes or type(refs) is not list:
                raise ProtocolError("malformed pickled field")
            if self.mapped is _PEEK:
                return None
            if not self.allow_code:
                raise ProtocolError("a pickled field was sent on a connection that may not ship"
                                    " code")
            self.deferred += 1
            return _Deferred(raw, refs)
        raise ProtocolError(f"unknown extension type {code}")

    def _list(self, data: bytes, length: int | None, what: str) -> list[Any]:
        value = self.unpack(data)
        if type(value) is not list or (length is not None and len(value) != length):
            raise ProtocolError(f"malformed {what} extension")
        return value

    def _buffer(self, data: bytes, *, tensor: bool) -> Any:
        name, shape, index = self._list(data, 3, "buffer reference")
        dtypes: dict[str, Any] = TORCH_DTYPES if tensor else _NUMPY_DTYPES
        if not isinstance(name, str) or name not in dtypes:
            raise ProtocolError(f"unknown {'tensor' if tensor else 'array'} dtype {name!r}")
        if (
            type(shape) is not list
            or len(shape) > _MAX_DIMS
            or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape)
        ):
            raise ProtocolError(f"malformed shape {shape!r}"[:200])
        expected = len(self.targets) if self.mapped is None else self.count
        if index != expected:
            raise ProtocolError(f"buffer index {index!r}, expected {expected}")
        itemsize = dtypes[name].itemsize
        nbytes = math.prod(shape) * itemsize
        if self.mapped is not None:
            self.count += 1
            return None if self.mapped is _PEEK else self._view(dtypes[name], shape, nbytes,
                                                                tensor=tensor)
        if nbytes > self.remaining:
            raise ProtocolError(
                f"buffer {index} needs {nbytes} bytes but the frame body has only "
                f"{self.remaining} left"
            )
        self.remaining -= nbytes
        value: Any
        target = memoryview(bytearray())
        if tensor:
            value = torch.empty(shape, dtype=dtypes[name])
            if nbytes:
                target = (value.numpy().data.cast("B") if value.dtype in _PLAIN_VIEW
                          else value.reshape(-1).view(torch.uint8).numpy().data)
        else:
            value = np.empty(shape, dtype=np.dtype(name))
            if nbytes:
                target = value.reshape(-1).view(np.uint8).data
        self.targets.append(target)
        return value

    def _view(self, dtype: Any, shape: list[int], nbytes: int, *, tensor: bool) -> Any:
        """A tensor/array over the mapping, at the next aligned offset (``shm.layout``)."""
        start = -(-self.cursor // _SHM_ALIGN) * _SHM_ALIGN
        if nbytes > self.remaining - start:
            raise ProtocolError(f"buffer {self.count - 1} needs bytes up to {start + nbytes} but"
                                f" the shared memory frame has only {self.remaining}")
        self.cursor = start + nbytes
        if tensor:
            if not nbytes:
                return torch.empty(shape, dtype=dtype)
            flat = torch.frombuffer(self.mapped, dtype=torch.uint8, count=nbytes, offset=start)
            return flat.view(dtype).view(shape)
        if not nbytes:
            return np.empty(shape, dtype=np.dtype(dtype.name))
        flat_array = np.frombuffer(self.mapped, dtype=np.uint8, count=nbytes, offset=start)
        return flat_array.view(np.dtype(dtype.name)).reshape(shape)

    def _record(self, data: bytes) -> Any:
        if self.mapped is _PEEK:
            self._list(data, 2, "record")  # still walked: it may hold buffer references
            return None
        if not self.allow_code:
            raise ProtocolError("a record was sent on a connection that has not authenticated")
        path, fields = self._list(data, 2, "record")
        if type(fields) is not dict or not all(isinstance(k, str) for k in fields):
            raise ProtocolError("malformed record")
        target = record_type(path)
        layout = _record_fields(target)
        if not fields.keys() <= layout.keys():
            unknown = set(fields) - set(layout)
            raise ProtocolError(f"record {path!r} has no field(s) {sorted(unknown)[:5]}")
        obj: Any = object.__new__(target)
        for name, field in layout.items():
            if name in fields:
                value = fields[name]
            elif field.default is not dataclasses.MISSING:
                value = field.default
            elif field.default_factory is not dataclasses.MISSING:
                value = field.default_factory()
            else:
                raise ProtocolError(f"record {path!r} lacks field {name!r}")
            object.__setattr__(obj, name, value)
        return obj


#: per dataclass type, its fields by name (record types, and what ``_resolve`` walks)
_FIELDS: dict[type, dict[str, dataclasses.Field[Any]]] = {}


def _record_fields(kind: type) -> dict[str, dataclasses.Field[Any]]:
    """``dataclasses.fields`` of a dataclass type, by name, looked up once per type."""
    layout = _FIELDS.get(kind)
    if layout is None:
        layout = _FIELDS[kind] = {f.name: f for f in dataclasses.fields(kind)}
    return layout


def _field_names(kind: type) -> Any:
    return _record_fields(kind).keys()


#: what a decoded tree holds that never contains a pickled field
_LEAVES = frozenset({str, int, float, bool, bytes, type(None), torch.Tensor, np.ndarray})


def _resolve(obj: Any) -> Any:
    """Replace pickled placeholders by their loaded objects, once buffers are filled."""
    kind = type(obj)
    if kind in _LEAVES:
        return obj
    if kind is _Deferred:
        return obj.load()
    if kind is list:
        return [_resolve(item) for item in obj]
    if kind is tuple:
        return tuple(_resolve(item) for item in obj)
    if kind is dict:
        return {_resolve(key): _resolve(value) for key, value in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for name in _field_names(kind):
            object.__setattr__(obj, name, _resolve(getattr(obj, name)))
    return obj
