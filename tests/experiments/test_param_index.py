"""``param(name, index=...)``: the part is cut where the weight lives, on every kind of model."""

from __future__ import annotations

import pytest
import torch
from cloche.errors import UsageError


def test_index_selects_part_of_the_canonical_weight(model):
    w_q = model.param("layers.1.attn.W_Q")  # (n_heads, d_model, d_head)
    torch.testing.assert_close(model.param("layers.1.attn.W_Q", index=2), w_q[2], atol=0, rtol=0)
    torch.testing.assert_close(model.param("layers.1.attn.W_Q", index=(slice(0, 2), 3)),
                               w_q[0:2, 3], atol=0, rtol=0)
    torch.testing.assert_close(model.param("blocks.1.attn.W_Q", index=(1, slice(None), -1)),
                               w_q[1, :, -1], atol=0, rtol=0)
    w_e = model.param("W_E")
    torch.testing.assert_close(model.param("embed.W_E", index=slice(5, 9)), w_e[5:9],
                               atol=0, rtol=0)


def test_a_bad_index_is_a_usage_error(model):
    with pytest.raises(UsageError, match="cannot index"):
        model.param("layers.0.attn.W_Q", index="head 3")
    with pytest.raises(UsageError, match="cannot apply"):
        model.param("layers.0.attn.W_Q", index=(0, 0, 0, 0))
