"""The page computations without a browser: both ways of reading the histogram agree, a
direction is a unit like any other, and bad units are clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from cloche.errors import UsageError
from cloche.ui.views import unit as unit_view
from cloche.ui.views._units import parse_unit

POINT = "layers.1.mlp.post"


def test_the_kept_values_and_a_second_pass_give_the_same_page(local_default, monkeypatch):
    kept = unit_view.unit_page(local_default, POINT, parse_unit("3", None), "default:heldout",
                               limit=8)
    monkeypatch.setattr(unit_view, "SAVED_TOKENS", 0)
    passes = unit_view.unit_page(local_default, POINT, parse_unit("3", None), "default:heldout",
                                 limit=8)
    assert kept["histogram"] == passes["histogram"]
    assert kept["quantiles"] == passes["quantiles"]
    assert kept["top"] == passes["top"]
    assert sum(kept["histogram"]["counts"]) == kept["stats"]["count"] == 8 * 128


def test_a_direction_page_reads_the_projection(local_default):
    point = "layers.0.resid_post"
    rng = np.random.default_rng(0)
    direction = rng.standard_normal(local_default.d_model)
    text = ",".join(f"{v:.6f}" for v in direction)
    page = unit_view.unit_page(local_default, point, parse_unit(None, text), "default:heldout",
                               limit=4)
    name = "test-ui/direction"
    try:
        local_default.run_dataset("default:heldout", probes={point: lambda c, x: c.save(
            "x", x.double())}, save=name, limit=4, progress=False)
        acts = np.concatenate([t.numpy() for t in local_default.save_context(name)
                               .fetch("x", "list")])
    finally:
        local_default.save_context(name).clear()
    values = acts @ np.asarray([float(v) for v in text.split(",")])
    assert page["stats"]["max"] == pytest.approx(values.max(), abs=1e-6)
    assert page["stats"]["min"] == pytest.approx(values.min(), abs=1e-6)
    assert page["correlated"] is None  # correlations are for single units
    assert "top" in page["logits"]  # a residual direction reads through the unembedding


@pytest.mark.parametrize(("unit", "direction", "words"), [
    (None, None, "exactly one"), ("3", "1,2", "exactly one"), ("-1", None, ">= 0"),
    ("x", None, "int"), (None, "1,a", "floats"), (None, "0,0", "not all zero"),
    (None, "1,inf", "finite")])
def test_bad_units_are_clear_errors(unit, direction, words):
    with pytest.raises(UsageError, match=words):
        parse_unit(unit, direction)


def test_a_unit_out_of_range_names_the_point(local_default):
    with pytest.raises(UsageError, match=r"out of range: layers\.1\.mlp\.post has 512 units"):
        unit_view.unit_page(local_default, POINT, parse_unit("512", None), "default:heldout",
                            limit=2)


def test_a_neuron_direction_reads_through_w_out(local_default):
    """A direction over neurons writes direction @ W_out to the residual stream: the page's
    promoted tokens are those of (direction @ W_out) @ W_U."""
    import torch
    from cloche.ui.views.unit import direct_effect

    direction = torch.zeros(local_default.d_mlp)
    direction[[3, 7]] = torch.tensor([1.0, -0.5])
    unit = parse_unit(None, ",".join(str(float(v)) for v in direction))
    effect = direct_effect(local_default, POINT, unit, k=5)
    w_out = local_default.param("layers.1.mlp.W_out").double()
    logits = (direction.double() @ w_out) @ local_default.param("unembed.W_U").double()
    assert [t for t, _ in effect["top"]] == local_default.to_str_tokens(logits.topk(5).indices)
    assert [v for _, v in effect["top"]] == pytest.approx(logits.topk(5).values.tolist())
