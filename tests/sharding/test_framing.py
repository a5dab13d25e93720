"""Objects framed for the trip between ranks come back equal, tensors carried beside the pickle."""

from __future__ import annotations

import pytest
import torch
from cloche.errors import ProtocolError
from cloche.sharding.framing import frame, unframe

KEY = b"k" * 32


def _tensors() -> list[torch.Tensor]:
    return [
        torch.randn(3, 4),
        torch.randn(2, 3).t(),  # strided: pickled whole, strides kept
        torch.tensor(3.5),  # zero dimensions
        torch.zeros(0, 5),  # no elements
        torch.arange(5, dtype=torch.int64),
        torch.tensor([True, False, True]),
        torch.randn(4, dtype=torch.bfloat16),
        torch.randn(7, dtype=torch.float16),
        torch.nn.Parameter(torch.randn(2)),
        torch.randn(2, requires_grad=True),
        torch.randn(9)[1:],  # a contiguous view of a larger storage
    ]


def test_every_kind_of_tensor_comes_back_equal_with_its_type_shape_strides_and_dtype() -> None:
    sent = {"ok": True, "value": _tensors(), "state": {"n": 3, "name": "x"}}
    got = unframe(KEY, "obj/1", frame(KEY, "obj/1", sent))
    assert got["state"] == sent["state"]
    for a, b in zip(sent["value"], got["value"], strict=True):
        assert type(a) is type(b)
        assert (a.dtype, a.shape, a.stride(), a.requires_grad) == \
            (b.dtype, b.shape, b.stride(), b.requires_grad)
        assert torch.equal(a.detach(), b.detach())


def test_a_tensor_referenced_twice_travels_once_and_comes_back_as_one() -> None:
    x = torch.randn(64, 64)
    got = unframe(KEY, "n", frame(KEY, "n", [x, {"again": x}]))
    assert got[0] is got[1]["again"]
    assert frame(KEY, "n", [x, x]).numel() < frame(KEY, "n", [x, x.clone()]).numel()


def test_framing_is_deterministic() -> None:
    value = {"value": _tensors()[:8]}
    assert torch.equal(frame(KEY, "n", value), frame(KEY, "n", value))


@pytest.mark.parametrize("where", ["seal", "pickle", "tensor bytes"])
def test_a_message_changed_anywhere_is_refused(where: str) -> None:
    message = frame(KEY, "n", {"value": torch.arange(100, dtype=torch.float32)})
    at = {"seal": 3, "pickle": 50, "tensor bytes": message.numel() - 10}[where]
    message[at] ^= 1
    with pytest.raises(ProtocolError):
        unframe(KEY, "n", message)


def test_a_message_sealed_under_another_name_or_key_is_refused() -> None:
    message = frame(KEY, "obj/1/res/1", {"value": 1})
    with pytest.raises(ProtocolError):
        unframe(KEY, "obj/2/res/1", message)
    with pytest.raises(ProtocolError):
        unframe(b"j" * 32, "obj/1/res/1", message)


def test_code_travels_by_value_with_its_captured_tensors_beside_the_pickle() -> None:
    vector = torch.randn(16)

    def steer(ctx: object, x: torch.Tensor) -> torch.Tensor:  # a closure, as in a notebook
        return x + vector

    message = frame(KEY, "cmd/1", {"probe": steer, "ids": torch.arange(8)}, code=True)
    assert message.numel() > vector.numel() * 4  # the vector's bytes are in the message
    got = unframe(KEY, "cmd/1", message)
    assert torch.equal(got["probe"](None, torch.zeros(16)), vector)
    assert torch.equal(got["ids"], torch.arange(8))
    with pytest.raises(ProtocolError):
        unframe(KEY, "cmd/2", message)
