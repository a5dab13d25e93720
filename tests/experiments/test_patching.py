"""Activation patching against hand-written probes that do the same patch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloche import experiments as ex

from tests.experiments.helpers import SEQ, pair


def by_hand(model, clean, corrupted, point, metric_of, *, position=None, head=None) -> float:
    """Save the clean activation, then replace it in the corrupted run, all with plain probes."""
    name = "test/hand"
    try:
        model.run(clean, probes={point: lambda c, x: c.save("x", x)}, save=name)
        saved = model.save_context(name).fetch("x")[0]

        def replace(ctx, x):
            y = x.clone()
            if head is not None:
                y[:, :, head] = saved[:, :, head].to(x)
            else:
                y[:, position] = saved[:, position].to(x)
            return y

        logits = model.run(corrupted, probes={point: replace}, save=name).logits
    finally:
        model.save_context(name).clear()
    return float(metric_of(logits).mean())


@pytest.mark.parametrize("kind", ["resid_pre", "mlp.out", "heads"])
def test_patch_grid_equals_hand_written_patches(model, kind):
    clean, corrupted = pair(model)
    correct, wrong = [5, 9], [7, 11]
    metric = ex.logit_diff(correct, wrong)

    def metric_of(logits):
        rows = torch.arange(logits.shape[0])
        return logits[rows, -1, correct] - logits[rows, -1, wrong]

    result = ex.patch_grid(model, clean, corrupted, metric, kind=kind, progress=False)
    width = model.n_heads if kind == "heads" else SEQ
    assert result.grid.shape == (model.n_layers, width)
    page = result._repr_html_()  # a shaded layer x column grid in a notebook
    assert f"patching {kind}" in page and page.count("<tr>") == model.n_layers + 1
    assert result.clean == pytest.approx(float(metric_of(model.run(clean).logits).mean()),
                                         rel=1e-4, abs=1e-5)
    cells = [(0, 1), (1, 3), (model.n_layers - 1, width - 1)]
    for layer, col in cells:
        if kind == "heads":
            want = by_hand(model, clean, corrupted, f"layers.{layer}.attn.z", metric_of, head=col)
        else:
            want = by_hand(model, clean, corrupted, f"layers.{layer}.{kind}", metric_of,
                           position=col)
        assert result.grid[layer, col] == pytest.approx(want, rel=1e-4, abs=1e-4)
    if kind == "resid_pre":  # patching the whole residual stream before layer 0 at the two
        # corrupted positions restores the clean run exactly
        full = ex.patch(model, clean, corrupted, "layers.0.resid_pre", metric, positions=[1, 3])
        assert full == pytest.approx(result.clean, rel=1e-4, abs=1e-5)
        # positions the corruption did not touch change nothing at layer 0
        np.testing.assert_allclose(result.grid[0, [0, 2]], result.corrupted, rtol=1e-4, atol=1e-4)


def test_patch_single_point_equals_hand_written(model):
    clean, corrupted = pair(model, batch=3)
    metric = ex.logit_diff(4, 8)
    got = ex.patch(model, clean, corrupted, "layers.1.attn.z", metric, heads=[0, 2])

    def metric_of(logits):
        return logits[:, -1, 4] - logits[:, -1, 8]

    name = "test/hand1"
    model.run(clean, probes={"layers.1.attn.z": lambda c, x: c.save("z", x)}, save=name)
    z = model.save_context(name).fetch("z")[0]
    model.save_context(name).clear()

    def replace(ctx, x):
        y = x.clone()
        y[:, :, [0, 2]] = z[:, :, [0, 2]]
        return y

    want = float(metric_of(model.run(corrupted, probes={"layers.1.attn.z": replace}).logits).mean())
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
