"""Dataset examples and single units against brute force over the same dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloche import experiments as ex
from cloche.errors import UsageError

from tests.experiments.helpers import activations_by_example, random_dataset

POINT = "layers.1.mlp.post"
RAW = {"skip_first": 0, "per_example": False}  # the top k over every (example, position)


def brute_force_top(acts: list[torch.Tensor], values_of, k: int, largest: bool = True):
    """Every (value, example id, position), ordered as TopK orders them."""
    rows = []
    for i, a in enumerate(acts):
        v = values_of(a)
        rows += [(float(v[p]), i, p) for p in range(len(v))]
    sign = -1 if largest else 1
    rows.sort(key=lambda r: (sign * r[0], r[1], r[2]))
    return rows[:k]


@pytest.mark.parametrize("largest", [True, False])
def test_top_examples_equal_brute_force(model, largest):
    ds = random_dataset(model)
    acts = activations_by_example(model, POINT, ds)
    got = ex.top_examples(model, POINT, 5, ds, k=6, largest=largest, batch_size=5, **RAW)
    want = brute_force_top(acts, lambda a: a[:, 5], 6, largest)
    assert [(e.example_id, e.position) for e in got] == [(i, p) for _, i, p in want]
    np.testing.assert_allclose([e.activation for e in got], [v for v, _, _ in want],
                               rtol=1e-5, atol=1e-6)
    for e in got:  # the window is the dataset's tokens, with the peak at the example's position
        row = ds[e.example_id].tolist()
        assert e.token_ids[e.peak] == row[e.position]
        start = e.position - e.peak
        assert e.token_ids == row[start:start + len(e.token_ids)]
        assert len(e.tokens) == len(e.token_ids) and "\u00ab" in e.context


def test_top_examples_of_a_direction(model):
    ds = random_dataset(model, n=8, seed=3)
    acts = activations_by_example(model, "layers.0.resid_post", ds)
    direction = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0))
    got = ex.top_examples(model, "layers.0.resid_post", direction, ds, k=4, **RAW)
    want = brute_force_top(acts, lambda a: a @ direction, 4)
    assert [(e.example_id, e.position) for e in got] == [(i, p) for _, i, p in want]
    np.testing.assert_allclose([e.activation for e in got], [v for v, _, _ in want], rtol=1e-4)


def test_top_examples_from_texts(model):
    try:
        model.tokenize("x")
    except UsageError:  # no tokenizer: a list of strings is refused clearly instead
        with pytest.raises(UsageError, match="tokenizer"):
            ex.top_examples(model, POINT, 3, ["def f(x): pass"], k=3)
        return
    texts = ["def f(x):\n    return x + 1\n", "for i in range(10):\n    print(i)\n",
             "class A:\n    pass\n"]
    got = ex.top_examples(model, POINT, 3, texts, k=3)
    ids = [model.tokenize(t) for t in texts]
    for e in got:
        assert e.token_ids[e.peak] == int(ids[e.example_id][e.position])
        assert "".join(e.tokens) in texts[e.example_id]
    assert [e.activation for e in got] == sorted((e.activation for e in got), reverse=True)


def test_quantile_examples_span_the_range(model):
    ds = random_dataset(model, n=10, seed=5)
    acts = activations_by_example(model, POINT, ds)
    bins = ex.quantile_examples(model, POINT, 2, ds, n_bins=4, k=3)
    assert len(bins) == 4 and all(len(b) <= 3 for b in bins)
    all_values = torch.cat([a[:, 2] for a in acts])
    lo, hi = float(all_values.min()), float(all_values.max())
    width = (hi - lo) / 4
    for b, examples in enumerate(bins):
        for e in examples:  # each activation is the unit's value there, inside its bin
            assert e.activation == pytest.approx(float(acts[e.example_id][e.position, 2]),
                                                 rel=1e-5, abs=1e-6)
            assert lo + b * width - 1e-6 <= e.activation <= lo + (b + 1) * width + 1e-6
    assert bins[0] and bins[-1]  # the extremes are always populated


def test_unit_stats_equal_brute_force(model):
    ds = random_dataset(model, n=9, seed=7)
    acts = activations_by_example(model, POINT, ds)
    values = torch.cat([a[:, 4] for a in acts]).double().numpy()
    s = ex.units.stats(model, POINT, 4, ds, bins=10, batch_size=4)
    assert s.count == len(values)
    assert s.mean == pytest.approx(values.mean(), rel=1e-5, abs=1e-7)
    assert s.std == pytest.approx(values.std(), rel=1e-4, abs=1e-7)
    assert (s.min, s.max) == (pytest.approx(values.min()), pytest.approx(values.max()))
    # brute-force activations come from other batches (other padding), so they can differ from
    # the server's in the last float32 bit: clip them to the server's range before binning
    counts, _ = np.histogram(np.clip(values, s.min, s.max), bins=10, range=(s.min, s.max))
    assert counts.sum() == s.counts.sum() == len(values)
    assert np.abs(counts - s.counts).sum() <= 2  # float32 vs float64 edge rounding only


def test_unit_activations_token_view(model):
    ids = torch.randint(3, model.d_vocab, (2, 7), generator=torch.Generator().manual_seed(4))
    view = ex.units.activations(model, POINT, [1, 6], ids)
    name = "test/unit"
    model.run(ids, probes={POINT: lambda c, x: c.save("x", x)}, save=name)
    full = model.save_context(name).fetch("x")[0]
    model.save_context(name).clear()
    np.testing.assert_allclose(view.values, full[..., [1, 6]].numpy(), rtol=1e-6)
    assert [len(t) for t in view.tokens] == [7, 7]
    assert len(view.rows(1)[0]) == 7


def test_top_activations_of_every_unit_in_one_pass(model):
    ds = random_dataset(model, n=8, seed=12)
    acts = activations_by_example(model, POINT, ds)
    top = ex.top_activations(model, POINT, ds, k=3)
    assert top["values"].shape == (3, model.d_mlp) and len(top["units"]) == model.d_mlp
    for unit in (0, model.d_mlp - 1):
        want = brute_force_top(acts, lambda a, u=unit: a[:, u], 3)
        assert list(zip(top["example_ids"][:, unit], top["positions"][:, unit])) == [
            (i, p) for _, i, p in want]
    some = ex.top_activations(model, POINT, ds, k=2, units=[4, 1])
    np.testing.assert_array_equal(some["values"], top["values"][:2, [4, 1]])
    np.testing.assert_array_equal(some["units"], [4, 1])


def test_top_examples_can_skip_the_first_positions(model):
    ds = random_dataset(model, n=8, seed=13)
    acts = activations_by_example(model, POINT, ds)
    got = ex.top_examples(model, POINT, 0, ds, k=5, skip_first=3, per_example=False)
    want = brute_force_top([a[3:] for a in acts], lambda a: a[:, 0], 5)
    assert [(e.example_id, e.position) for e in got] == [(i, p + 3) for _, i, p in want]


def test_top_examples_default_to_one_entry_per_example_after_the_first_positions(model):
    ds = random_dataset(model, n=8, seed=14)
    acts = activations_by_example(model, POINT, ds)
    got = ex.top_examples(model, POINT, 2, ds, k=5)
    best = []  # each example's best position past the first 4, as TopK would rank them
    for i, a in enumerate(acts):
        values = a[4:, 2]
        p = int(values.argmax())
        best.append((float(values[p]), i, p + 4))
    best.sort(key=lambda r: (-r[0], r[1], r[2]))
    assert [(e.example_id, e.position) for e in got] == [(i, p) for _, i, p in best[:5]]
    assert len({e.example_id for e in got}) == len(got)
    assert (got.skip_first, got.per_example) == (4, True)
    assert "first 4 position(s) of each example skipped" in str(got).splitlines()[0]
    assert "one entry per example" in got.describe()
