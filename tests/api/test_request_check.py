"""``Request.check``: every request record checks its own fields (the server calls it before
running a request from a peer that may not have used the facade)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from cloche.api import requests as rq
from cloche.errors import UnknownProbePoint, UsageError
from cloche.model.info import ModelInfo

MODEL = ModelInfo(name="m", family="gpt2", model_type="gpt2", n_layers=2, n_heads=4,
                  n_kv_heads=4, d_model=32, d_mlp=128, d_head=8, d_vocab=300, causal=True,
                  device="cpu", world_size=2, point_names=("embed", "layers.0.mlp.post"),
                  max_positions=64)


def ids(n=3):
    return torch.arange(5, 5 + n).reshape(1, n)


def mask(n=3):
    return torch.ones(1, n, dtype=torch.long)


def noop(ctx, x):
    return None


@pytest.mark.parametrize(("op", "field"), [
    (rq.Run(ids=torch.rand(1, 3), mask=mask()), "ids"),
    (rq.Run(ids=ids(), mask=torch.ones(1, 4)), "mask"),
    (rq.Run(ids=ids(), mask=mask() * 2), "mask"),
    (rq.Run(ids=ids(), mask=mask(), forward={"embed": noop}), "forward"),
    (rq.Run(ids=ids(), mask=mask(), backward_probes={"embed": [noop]}), "backward_probes"),
    (rq.Run(ids=ids(), mask=mask(), backward=False), "backward"),
    (rq.Run(ids=ids(), mask=mask(), save=""), "save"),
    (rq.Run(ids=ids(), mask=mask(), return_logits=1), "return_logits"),
    (rq.Run(ids=ids(), mask=mask(), micro_batches=0), "micro_batches"),
    (rq.Generate(ids=ids(), mask=mask(), options={"bogus": 1}), "options"),
    (rq.Generate(ids=ids(), mask=mask(), options={"max_new_tokens": 0}), "max_new_tokens"),
    (rq.Generate(ids=ids(), mask=mask(), seed=-1), "seed"),
    (rq.RunDataset(dataset=3), "dataset"),
    (rq.RunDataset(dataset=["x"], batch_size=True), "batch_size"),
    (rq.RunDataset(dataset=["x"], limit=-1), "limit"),
    (rq.Call(fn=3), "fn"),
    (rq.Call(fn=noop, kwargs={1: 2}), "kwargs"),
    (rq.Call(fn=noop, rank="some"), "rank"),
    (rq.Context(name="c", action="explode"), "action"),
    (rq.Context(name="", action="keys"), "name"),
    (rq.Context(name="c", action="fetch", args=("key",)), "args"),
    (rq.Context(name="c", action="fetch", args=("key", "heap", None)), "fetch mode"),
    (rq.Context(name="c", action="fetch", args=("key", "stack", [["index", [1.5]]])), "ops"),
    (rq.Context(name="c", action="persist", args=("",)), "path"),
    (rq.Param(name=""), "name"),
    (rq.Param(name="embed.W_E", grad="yes"), "grad"),
    (rq.ParamNames(canonical=None), "canonical"),
])
def test_check_names_the_field(op, field):
    with pytest.raises(UsageError, match=field):
        op.check()


@pytest.mark.parametrize(("op", "match"), [
    (rq.Run(ids=torch.tensor([[5, 300]]), mask=torch.ones(1, 2)), r"vocabulary \[0, 300\)"),
    (rq.Run(ids=ids(65), mask=mask(65)), "at most 64 tokens"),
    (rq.Generate(ids=ids(60), mask=mask(60), options={"max_new_tokens": 5}), "within 64"),
    (rq.Call(fn=noop, rank=2), r"\[0, 2\)"),
])
def test_check_against_the_served_model(op, match):
    op.check()  # fine without the model's description...
    with pytest.raises(UsageError, match=match):
        op.check(MODEL)  # ...not with it


def test_unknown_points_are_unknown_probe_points():
    with pytest.raises(UnknownProbePoint, match="forward"):
        rq.Run(ids=ids(), mask=mask(), forward={"nowhere": [noop]}).check(MODEL)
    with pytest.raises(UnknownProbePoint, match="point"):
        rq.Owner(point="nowhere").check(MODEL)


def test_what_the_facade_builds_passes():
    for op in [
        rq.Run(ids=ids(), mask=mask(), forward={"embed": [noop]}, backward=True,
               backward_probes={"layers.0.mlp.post": [noop]}, micro_batches=2),
        rq.Generate(ids=ids(), mask=mask(), options={
            "max_new_tokens": 4, "do_sample": True, "pad_token_id": 0, "temperature": 0.7,
            "top_k": 0, "top_p": 1.0}, seed=2**62),
        rq.RunDataset(dataset=["a", "b"], batch_size=2, limit=0),
        rq.Call(fn=noop, args=(1,), kwargs={"a": 1}, rank="all"), rq.Call(fn=noop, rank=1),
        rq.Context(name="c", action="fetch", args=("k", "stack", [["index", [
            0, {"s": [None, 2, None]}, {"n": None}, {"e": 1}, {"l": [0, 1]}]], ["to", "float16"]])),
        rq.Context(name="c", action="result", args=("mean",)), rq.Context(name="c", action="keys"),
        rq.Param(name="embed.W_E", grad=True), rq.Owner(point="embed"), rq.Ping(value=[1]),
    ]:
        op.check(MODEL)


@pytest.mark.parametrize("n", [3, 300])  # a few values (checked in Python) and many (tensor ops)
def test_token_and_mask_checks_agree_for_short_and_long_inputs(n):
    good = torch.arange(n).reshape(1, n) % 300
    for ok_mask in (torch.ones(1, n, dtype=torch.bool), torch.zeros(1, n),
                    torch.ones(1, n, dtype=torch.bfloat16), torch.ones(1, n, dtype=torch.uint8)):
        rq.Run(ids=good, mask=ok_mask).check(MODEL if n <= 64 else None)
    for bad_mask in (torch.full((1, n), float("nan")), torch.full((1, n), 0.5),
                     torch.full((1, n), -1, dtype=torch.int8)):
        with pytest.raises(UsageError, match="only 0 and 1"):
            rq.Run(ids=good, mask=bad_mask).check()
    with pytest.raises(UsageError, match=r"ids from -1 to"):
        rq.Run(ids=good - 1, mask=torch.ones(1, n)).check()
    high = good.clone()
    high[0, -1] = 300
    with pytest.raises(UsageError, match=r"ids from \d+ to 300"):
        rq.Run(ids=high, mask=torch.ones(1, n)).check(dataclasses.replace(MODEL, max_positions=0))
