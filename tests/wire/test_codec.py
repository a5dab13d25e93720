"""Codec round trips (hypothesis) and its refusals."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
import torch
from cloche.errors import ProtocolError, UsageError
from cloche.wire import codec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

COMMON_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
    torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
]


def roundtrip(value, *, allow_code=False):
    encoded = codec.encode(value)
    body = b"".join(bytes(buf) for buf in encoded.buffers)
    return codec.decode(encoded.header, body, allow_code=allow_code)


@st.composite
def tensors(draw):
    dtype = draw(st.sampled_from(COMMON_DTYPES))
    shape = draw(st.lists(st.integers(0, 4), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        tensor = torch.rand(shape, generator=gen) > 0.5
    elif dtype.is_floating_point or dtype.is_complex:
        tensor = (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    else:
        info = torch.iinfo(dtype)
        tensor = torch.randint(info.min, info.max, shape, generator=gen, dtype=dtype)
    if draw(st.booleans()) and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)  # non-contiguous input
    return tensor


scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(
    allow_nan=False
) | st.text(max_size=20) | st.binary(max_size=20)
leaves = scalars | tensors() | st.builds(lambda t: t.numpy() if t.dtype != torch.bfloat16 else t,
                                         tensors())
trees = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.tuples(children, children)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def assert_same(a, b):
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        def raw(t):
            return t.view(torch.uint8) if t.dim() and t.dtype == torch.bool else t

        assert torch.equal(raw(a), raw(b))
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_round_trip_nested_trees(tree):
    assert_same(tree, roundtrip(tree))


@pytest.mark.parametrize("dtype", [*COMMON_DTYPES, torch.uint16, torch.float8_e4m3fn])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (2, 3)])
def test_round_trip_every_dtype_and_degenerate_shapes(dtype, shape):
    tensor = torch.ones(shape).to(dtype)
    out = roundtrip({"t": tensor})["t"]
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out.view(torch.uint8) if out.dim() else out.reshape(1).view(torch.uint8),
                       tensor.view(torch.uint8) if tensor.dim() else tensor.reshape(1).view(torch.uint8))


def test_tensor_bytes_travel_raw_after_a_small_header():
    tensor = torch.arange(1 << 16, dtype=torch.float32)
    encoded = codec.encode({"x": tensor})
    assert len(encoded.header) < 64
    assert encoded.body_len == tensor.numel() * 4
    assert bytes(encoded.buffers[0]) == tensor.numpy().tobytes()


def test_special_values_keep_their_types():
    value = {
        "dtype": torch.bfloat16, "size": torch.Size([2, 3]), "slice": slice(1, None, -2),
        "ellipsis": ..., "np_scalar": np.float32(1.5), "int_keys": {1: "a", (2, 3): "b"},
        "grad": torch.ones(2, requires_grad=True) * 2,
    }
    out = roundtrip(value)
    assert out["dtype"] is torch.bfloat16 and out["size"] == torch.Size([2, 3])
    assert type(out["size"]) is torch.Size and out["slice"] == slice(1, None, -2)
    assert out["ellipsis"] is Ellipsis and out["np_scalar"] == np.float32(1.5)
    assert type(out["np_scalar"]) is np.float32 and out["int_keys"] == {1: "a", (2, 3): "b"}
    assert torch.equal(out["grad"], torch.full((2,), 2.0)) and not out["grad"].requires_grad


def test_functions_and_objects_need_allow_code():
    base = torch.arange(4.0)
    payload = {"fn": lambda x: x + base, "obj": {1, 2}}
    with pytest.raises(ProtocolError, match="may not ship code"):
        roundtrip(payload)
    out = roundtrip(payload, allow_code=True)
    assert torch.equal(out["fn"](1), base + 1) and out["obj"] == {1, 2}


def test_tensors_inside_pickles_travel_as_buffers_not_pickled():
    big = torch.arange(100_000, dtype=torch.float32)

    class Holder:
        def __init__(self, a):
            self.a, self.b = a, a

    encoded = codec.encode(Holder(big))
    assert encoded.body_len == big.numel() * 4  # one buffer, shared by both attributes
    assert len(encoded.header) < 4000
    out = roundtrip(Holder(big), allow_code=True)
    assert torch.equal(out.a, big) and out.a is out.b


def test_unloadable_pickle_is_a_usage_error_after_the_frame():
    encoded = codec.encode({"fn": lambda: 1})
    header = encoded.header.replace(b"cloudpickle", b"cloudpicklX")
    pending = codec.decode_header(header, 0, allow_code=True)
    assert isinstance(pending.peek(), dict)
    with pytest.raises(UsageError):
        pending.finish()


def test_unencodable_values_are_usage_errors():
    with pytest.raises(UsageError):
        codec.encode({"sparse": torch.eye(2).to_sparse()})
    import threading

    with pytest.raises(UsageError):
        codec.encode({"lock": threading.Lock()})


def ext(code, payload):
    return msgpack.ExtType(code, msgpack.packb(payload))


@pytest.mark.parametrize(
    ("header", "body_len"),
    [
        (b"\xc1", 0),  # never-used msgpack byte
        (b"\x92\x01", 0),  # truncated array
        (msgpack.packb({"a": 1}) + b"\x00", 0),  # trailing bytes
        (msgpack.packb(ext(99, [])), 0),  # unknown extension
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float32", [4], 0])), 8),  # needs 16 bytes
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float32", [1], 0])), 8),  # 4 bytes unclaimed
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float32", [1], 1])), 4),  # wrong index
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float33", [1], 0])), 4),  # unknown dtype
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float32", [-1], 0])), 4),  # negative dim
        (msgpack.packb(ext(codec.EXT_TENSOR, ["float32", [2**40, 2**40], 0])), 4),  # huge
        (msgpack.packb(ext(codec.EXT_TENSOR, "x")), 0),
        (msgpack.packb(ext(codec.EXT_RECORD, ["os:system", {}])), 0),  # not a cloche type
        (msgpack.packb(ext(codec.EXT_RECORD, ["cloche.errors:ClocheError", {}])), 0),
        (msgpack.packb(ext(codec.EXT_DTYPE, "float32x")), 0),
        (msgpack.packb({(1,): 2}), 0),  # list key: unhashable
        (b"\x91" * 5000 + b"\xc0", 0),  # deep nesting
    ],
)
def test_malformed_headers_raise_protocol_error(header, body_len):
    with pytest.raises(ProtocolError):
        codec.decode_header(header, body_len)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 20))
def test_random_headers_raise_only_protocol_errors(header, body_len):
    try:
        pending = codec.decode_header(header, body_len, allow_code=False)
    except ProtocolError:
        return
    assert sum(t.nbytes for t in pending.targets) == body_len


def test_one_element_views_with_odd_strides_round_trip():
    base = torch.arange(15.0).reshape(3, 5)
    for view in (base[:, 2:3][0:1], base.T[1:2, 0:1], base[1, 3:4]):
        out = roundtrip({"t": view})["t"]
        assert torch.equal(out, view)


def test_views_with_a_negative_bit_or_a_grad_travel_as_their_values():
    imag = torch.tensor([1 + 2j, 3 - 4j]).conj().imag  # a real view with the negative bit
    assert imag.is_neg()
    weight = torch.randn(2, 3, requires_grad=True)
    out = roundtrip({"imag": imag, "weight": weight})
    assert torch.equal(out["imag"], torch.tensor([-2.0, 4.0]))
    assert torch.equal(out["weight"], weight.detach()) and not out["weight"].requires_grad
