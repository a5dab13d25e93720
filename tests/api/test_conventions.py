"""Small conventions that hold across the public API (issue 15, item 5): ``nbytes`` is a
property wherever a user meets it, as on tensors and arrays."""

from __future__ import annotations

import cloche


def test_nbytes_is_one_kind_everywhere(tiny_model):
    model = tiny_model("gpt2")
    model.run([[5, 6, 7, 8]], save="conv", progress=False,
              probes={"layers.0.mlp.post": lambda ctx, x: ctx.reduce("m", x, cloche.Mean())
                      or ctx.save("x", x)})
    handle = model.save_context("conv")
    try:
        reducer = handle.reducers()["m"]
        # read like a tensor's: an attribute that is a number, not a method to call
        for value in (handle.nbytes, reducer.nbytes, handle.fetch("x").nbytes):
            assert isinstance(value, int) and value > 0
        assert handle.nbytes >= reducer.nbytes + handle.fetch("x").nbytes
    finally:
        handle.clear()
