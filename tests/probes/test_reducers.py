"""Reducers against numpy: random data, random splits merged in random order, masks, empties.

Each property draws a data set, computes the one-shot answer with numpy on the kept rows,
and checks that (a) one update over everything and (b) the same data cut into arbitrary
parts (some empty), each fed to a fresh reducer and merged back in a random tree order,
both give that answer. TopK is checked exactly against a brute-force sort with the same
tie-breaking, on data full of ties.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from cloche.errors import UsageError
from cloche.probes.reducers import (
    REDUCERS,
    Covariance,
    Histogram,
    Mean,
    MinMax,
    Reducer,
    TopK,
    Variance,
    reducer_from_state,
)
from hypothesis import given, settings
from hypothesis import strategies as st

PROPERTY = settings(max_examples=50, deadline=None)


# ----- data and the split/merge harness ----------------------------------------------------
@st.composite
def row_data(draw, *, ties: bool = False):
    """(rows (n, d) numpy in float32/float64, keep mask (n,) or None, cuts, rng)."""
    d = draw(st.integers(1, 5))
    n = draw(st.integers(0, 40))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if ties:
        data = rng.integers(-3, 4, size=(n, d)).astype(dtype)
    else:
        offset = draw(st.sampled_from([0.0, 3.0, -1e3]))
        scale = draw(st.sampled_from([1e-2, 1.0, 50.0]))
        data = (rng.standard_normal((n, d)) * scale + offset).astype(dtype)
    mask = (rng.random(n) < 0.7) if draw(st.booleans()) else None
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=5)))
    return data, mask, cuts, rng


def kept(data: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The rows the reducer should see, in float64 (the reducer's accumulation type)."""
    rows = data.astype(np.float64)
    return rows if mask is None else rows[mask]


def feed(reducer: Reducer, part: np.ndarray, mask: np.ndarray | None, rng) -> None:
    """Update with a part, in a randomly chosen leading shape ((n, d), (1, n, d), (n, 1, d))."""
    x = torch.from_numpy(part)
    m = None if mask is None else torch.from_numpy(mask)
    lead = [(len(part),), (1, len(part)), (len(part), 1)][rng.integers(3)]
    reducer.update(x.reshape(*lead, part.shape[1]), mask=None if m is None else m.reshape(lead))


def merged_in_random_order(parts: list[Reducer], rng) -> Reducer:
    """Merge reducers pairwise, picking random pairs, until one is left (a random tree)."""
    parts = list(parts)
    while len(parts) > 1:
        i, j = sorted(rng.choice(len(parts), size=2, replace=False))
        b = parts.pop(j)
        a = parts.pop(i)
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        parts.append(first.merge(second))
    return parts[0]


def one_shot_and_split(proto: Reducer, data, mask, cuts, rng) -> tuple[dict, dict]:
    """Results of one update over everything, and of the split-and-merge path."""
    whole = proto.empty_like()
    feed(whole, data, mask, rng)
    bounds = [0, *cuts, len(data)]
    parts = []
    for a, b in itertools.pairwise(bounds):
        r = proto.empty_like()
        feed(r, data[a:b], None if mask is None else mask[a:b], rng)
        parts.append(r)
    parts.append(proto.empty_like())  # a reducer that never saw data merges as identity
    return whole.result(), merged_in_random_order(parts, rng).result()


def close(actual: torch.Tensor, expected, *, scale: float, rel: float = 1e-9) -> None:
    assert actual.dtype == torch.float64 and actual.device.type == "cpu"
    np.testing.assert_allclose(
        actual.numpy(),
        np.asarray(expected, dtype=np.float64),
        rtol=rel,
        atol=rel * scale,
        equal_nan=True,
    )


def magnitude(rows: np.ndarray) -> float:
    return float(np.abs(rows).max()) if rows.size else 1.0


# ----- moments ------------------------------------------------------------------------------
@PROPERTY
@given(row_data())
def test_mean_matches_numpy_for_any_split(case):
    data, mask, cuts, rng = case
    rows = kept(data, mask)
    for res in one_shot_and_split(Mean(), data, mask, cuts, rng):
        assert res["count"].item() == len(rows)
        expected = rows.mean(0) if len(rows) else np.full(data.shape[1], np.nan)
        close(res["mean"], expected, scale=magnitude(rows))


@PROPERTY
@given(row_data())
def test_variance_matches_numpy_for_any_split(case):
    data, mask, cuts, rng = case
    rows = kept(data, mask)
    n, d = len(rows), data.shape[1]
    nan = np.full(d, np.nan)
    for res in one_shot_and_split(Variance(), data, mask, cuts, rng):
        assert res["count"].item() == n
        spread = float(rows.std(0).max()) ** 2 if n else 1.0
        # Errors of a merged variance scale with eps * (mean² + var): allow for both.
        scale = spread + 1e-6 * magnitude(rows) ** 2
        close(res["mean"], rows.mean(0) if n else nan, scale=magnitude(rows))
        close(res["var"], rows.var(0) if n else nan, scale=scale, rel=1e-8)
        close(res["std"], rows.std(0) if n else nan, scale=scale**0.5, rel=1e-6)
        close(res["var_sample"], rows.var(0, ddof=1) if n > 1 else nan, scale=scale, rel=1e-8)


def reference_corr(cov: np.ndarray) -> np.ndarray:
    std = np.sqrt(np.diag(cov))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(cov / np.outer(std, std), -1.0, 1.0)


@PROPERTY
@given(row_data())
def test_covariance_matches_numpy_for_any_split(case):
    data, mask, cuts, rng = case
    rows = kept(data, mask)
    n, d = len(rows), data.shape[1]
    nan = np.full((d, d), np.nan)
    for res in one_shot_and_split(Covariance(), data, mask, cuts, rng):
        assert res["count"].item() == n
        scale = (float(rows.std(0).max()) ** 2 if n else 1.0) + 1e-6 * magnitude(rows) ** 2
        cov = np.cov(rows.T, bias=True).reshape(d, d) if n else nan
        close(res["mean"], rows.mean(0) if n else np.full(d, np.nan), scale=magnitude(rows))
        close(res["cov"], cov, scale=scale, rel=1e-8)
        close(
            res["cov_sample"],
            np.cov(rows.T, ddof=1).reshape(d, d) if n > 1 else nan,
            scale=scale,
            rel=1e-8,
        )
        if n > 1:
            close(res["corr"], reference_corr(cov), scale=1.0, rel=1e-6)
        # The diagonal of the covariance is the variance.
        if n:
            close(res["cov"].diagonal(), rows.var(0), scale=scale, rel=1e-8)


# ----- counts -------------------------------------------------------------------------------
@PROPERTY
@given(
    row_data(ties=True),
    st.integers(1, 9),
    st.sampled_from([(-2.0, 2.0), (-3.5, 1.0), (0.0, 0.5)]),
    st.booleans(),
)
def test_histogram_matches_numpy_for_any_split(case, bins, bounds, per_unit):
    # Integer data on these bounds lands exactly on edges (and on `high`) often.
    data, mask, cuts, rng = case
    low, high = bounds
    rows = kept(data, mask)
    d = data.shape[1]
    hist = Histogram(bins, low, high, per_unit=per_unit)
    edges = np.linspace(low, high, bins + 1)
    for res in one_shot_and_split(hist, data, mask, cuts, rng):
        assert res["count"].item() == len(rows)
        close(res["edges"], edges, scale=1.0, rel=1e-15)
        exact_edges = res["edges"].numpy()
        if per_unit:
            counts = np.stack([np.histogram(rows[:, j], bins=exact_edges)[0] for j in range(d)])
            under, over = (rows < low).sum(0), (rows > high).sum(0)
        else:
            counts = np.histogram(rows.ravel(), bins=exact_edges)[0]
            under, over = (rows < low).sum(), (rows > high).sum()
        assert res["counts"].dtype == torch.int64
        np.testing.assert_array_equal(res["counts"].numpy(), counts)
        np.testing.assert_array_equal(res["underflow"].numpy(), under)
        np.testing.assert_array_equal(res["overflow"].numpy(), over)
        np.testing.assert_array_equal(res["nan"].numpy(), np.zeros_like(under))
        total = res["counts"].sum() + res["underflow"].sum() + res["overflow"].sum()
        assert total.item() == rows.size


def test_histogram_counts_nans_separately():
    h = Histogram(2, 0.0, 1.0)
    h.update(torch.tensor([[float("nan"), 0.25], [1.0, float("inf")], [-1.0, 0.5]]))
    res = h.result()
    assert res["counts"].tolist() == [[0, 1], [1, 1]]
    assert res["nan"].tolist() == [1, 0]
    assert res["underflow"].tolist() == [1, 0]
    assert res["overflow"].tolist() == [0, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bins", "low", "high"), [
    (64, -4.0, 4.0), (7, -1.3, 2.9), (10, 1000.0, 1001.0), (100_000, -1.0, 1.0), (5, -3e5, 7e5),
    (3, -1e-30, 1e-30)])
def test_histogram_bins_values_next_to_edges_as_bucketize_does(dtype, bins, low, high):
    # Bins come from the bin width, corrected near edges: values on, just above and just below
    # every edge (in float64 and rounded to the input dtype) land where a float64 search would.
    hist = Histogram(bins, low, high)
    edges = hist.edges()
    above, below = torch.full_like(edges, 1e300), torch.full_like(edges, -1e300)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30, low, high])
    x = torch.cat([torch.randn(2000, generator=torch.Generator().manual_seed(0)) * (high - low)
                   + low, edges, edges.to(dtype).double(), torch.nextafter(edges, above),
                   torch.nextafter(edges, below), special]).to(dtype)
    hist.update(x[:, None])
    r = x.double()
    slot = torch.bucketize(r, edges, right=True)
    slot.masked_fill_(r == high, bins).masked_fill_(r.isnan(), bins + 2)
    res = hist.result()
    expected = torch.bincount(slot, minlength=bins + 3)
    assert res["underflow"].item() == expected[0]
    assert res["counts"][0].tolist() == expected[1:-2].tolist()
    assert (res["overflow"].item(), res["nan"].item()) == (expected[-2], expected[-1])


@PROPERTY
@given(row_data())
def test_minmax_matches_numpy_for_any_split(case):
    data, mask, cuts, rng = case
    rows = kept(data, mask)
    d = data.shape[1]
    for res in one_shot_and_split(MinMax(), data, mask, cuts, rng):
        assert res["count"].item() == len(rows)
        # Comparisons only: exact.
        np.testing.assert_array_equal(
            res["min"].numpy(), rows.min(0) if len(rows) else np.full(d, np.nan)
        )
        np.testing.assert_array_equal(
            res["max"].numpy(), rows.max(0) if len(rows) else np.full(d, np.nan)
        )


# ----- top-k --------------------------------------------------------------------------------
def brute_force_topk(values, ids, positions, k: int, largest: bool):
    """Per unit, sort every (value, id, position) by value, then id, then position; keep k."""
    d = values.shape[1]
    out_v, out_i, out_p = [], [], []
    for j in range(d):
        entries = sorted(
            zip(values[:, j].tolist(), ids.tolist(), positions.tolist()),
            key=lambda e: ((-e[0] if largest else e[0]), e[1], e[2]),
        )[:k]
        out_v.append([e[0] for e in entries])
        out_i.append([e[1] for e in entries])
        out_p.append([e[2] for e in entries])
    m = min(k, len(values))
    return (
        np.array(out_v, dtype=np.float64).reshape(d, m).T,
        np.array(out_i, dtype=np.int64).reshape(d, m).T,
        np.array(out_p, dtype=np.int64).reshape(d, m).T,
    )


@st.composite
def topk_data(draw, *, long: bool = False):
    """(x (B, S, d) or (B, d) numpy, example ids (B,), mask or None, batch cuts, rng).

    ``long``: batches of hundreds of rows (the fast topk path and the tie path both run, and
    the merge sorts long candidate lists), some with infinities."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if long:
        batch, seq, d = draw(st.integers(1, 6)), draw(st.integers(20, 70)), draw(st.integers(1, 5))
    else:
        batch, seq, d = draw(st.integers(0, 8)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    three_d = long or draw(st.booleans())
    shape = (batch, seq, d) if three_d else (batch, d)
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if draw(st.booleans()):  # many ties
        x = rng.integers(-2, 3, size=shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    # Ids usually distinct, sometimes repeated, never in order.
    if long and draw(st.booleans()):  # infinities, some of them among the best
        x.reshape(-1)[rng.choice(x.size, size=min(x.size, 5), replace=False)] = rng.choice(
            [np.inf, -np.inf], size=min(x.size, 5))
    ids = rng.permutation(1000)[:batch] if draw(st.booleans()) else rng.integers(0, 3, batch)
    mask = (rng.random(shape[:-1]) < 0.7) if draw(st.booleans()) else None
    cuts = sorted(draw(st.lists(st.integers(0, batch), max_size=4)))
    return x, ids.astype(np.int64), mask, cuts, rng


def topk_reference(x, ids, mask, k, largest):
    if x.ndim == 3:
        positions = np.broadcast_to(np.arange(x.shape[1]), x.shape[:2])
        row_ids = np.broadcast_to(ids[:, None], x.shape[:2])
    else:
        positions = np.full(x.shape[:1], -1)
        row_ids = ids
    keep = np.ones(x.shape[:-1], bool) if mask is None else mask
    return brute_force_topk(
        x[keep].astype(np.float64), row_ids[keep], positions[keep], k, largest
    ), int(keep.sum())


def topk_feed(r: TopK, x, ids, mask) -> None:
    r.update(
        torch.from_numpy(x),
        example_ids=torch.from_numpy(ids),
        mask=None if mask is None else torch.from_numpy(mask),
    )


@PROPERTY
@given(topk_data(), st.integers(1, 6), st.booleans())
def test_topk_equals_brute_force_for_any_split(case, k, largest):
    x, ids, mask, cuts, rng = case
    (values, example_ids, positions), count = topk_reference(x, ids, mask, k, largest)
    whole = TopK(k, largest=largest)
    topk_feed(whole, x, ids, mask)
    bounds = [0, *cuts, len(x)]
    parts = [TopK(k, largest=largest)]
    for a, b in itertools.pairwise(bounds):
        parts.append(TopK(k, largest=largest))
        topk_feed(parts[-1], x[a:b], ids[a:b], None if mask is None else mask[a:b])
    for r in (whole, merged_in_random_order(parts, rng)):
        res = r.result()
        assert res["count"].item() == count
        if r.d is None:  # no batch rows at all: d never fixed
            assert res["values"].shape == (0, 0)
            continue
        np.testing.assert_array_equal(res["values"].numpy(), values)
        np.testing.assert_array_equal(res["example_ids"].numpy(), example_ids)
        np.testing.assert_array_equal(res["positions"].numpy(), positions)


@PROPERTY
@given(topk_data(long=True), st.integers(1, 6), st.booleans())
def test_topk_of_long_batches_equals_brute_force_for_any_split(case, k, largest):
    """Batches of hundreds of rows give exactly the brute-force answer, ties, infinities
    and padding included, however they are split and merged."""
    test_topk_equals_brute_force_for_any_split.hypothesis.inner_test(case, k, largest)


@st.composite
def topk_stream(draw):
    """Batches fed one after another into one reducer: once k rows are kept, only candidates
    beyond each unit's k-th value are folded in (some units dense: dead, tied or heavy)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batches, batch, seq = draw(st.integers(2, 8)), draw(st.integers(1, 4)), draw(st.integers(8, 40))
    d = draw(st.integers(8, 40))
    shape = (batches * batch, seq, d)
    x = rng.standard_normal(shape)
    if draw(st.booleans()):  # ties everywhere
        x = np.round(x * 2) / 2
    dead = rng.random(d) < draw(st.sampled_from([0.0, 0.1, 0.5]))
    x[..., dead] = 0.0  # a dead unit: every value ties at the floor
    drift = draw(st.sampled_from([0.0, 0.5]))  # later batches larger: many new candidates
    x += drift * np.arange(batches).repeat(batch)[:, None, None]
    if draw(st.booleans()):
        flat = x.reshape(-1)
        flat[rng.choice(flat.size, size=8, replace=False)] = rng.choice([np.inf, -np.inf], 8)
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    x = torch.from_numpy(x).to(dtype).double().numpy()  # values exact in every dtype
    ids = rng.permutation(10 * len(x))[: len(x)] if draw(st.booleans()) else rng.integers(
        0, 4, len(x))
    mask = (rng.random(shape[:-1]) < 0.8) if draw(st.booleans()) else None
    return x, ids.astype(np.int64), mask, batches, dtype


@PROPERTY
@given(topk_stream(), st.integers(1, 6), st.booleans())
def test_topk_fed_batch_after_batch_equals_brute_force(case, k, largest):
    x, ids, mask, batches, dtype = case
    (values, example_ids, positions), count = topk_reference(x, ids, mask, k, largest)
    r = TopK(k, largest=largest)
    for part in np.array_split(np.arange(len(x)), batches):
        r.update(torch.from_numpy(x[part]).to(dtype), example_ids=torch.from_numpy(ids[part]),
                 mask=None if mask is None else torch.from_numpy(mask[part]))
    res = r.result()
    assert res["count"].item() == count
    np.testing.assert_array_equal(res["values"].numpy(), values)
    np.testing.assert_array_equal(res["example_ids"].numpy(), example_ids)
    np.testing.assert_array_equal(res["positions"].numpy(), positions)


def test_topk_folds_only_the_candidates_beyond_the_floor(monkeypatch):
    """After the first batch, a batch like it leaves a few candidates per unit: no top-k over
    the batch runs (the path the property above checks for exactness)."""
    r = TopK(4)
    gen = torch.Generator().manual_seed(0)
    r.update(torch.randn(8, 64, 32, generator=gen), example_ids=torch.arange(8))
    calls = []
    monkeypatch.setattr(TopK, "_fold_best", lambda self, *a: calls.append(a))
    r.update(torch.randn(8, 64, 32, generator=gen), example_ids=torch.arange(8, 16))
    assert calls == [] and r.count == 2 * 8 * 64


def test_topk_breaks_ties_by_example_id_then_position():
    r = TopK(3)
    x = torch.ones(2, 3, 1)  # every value ties
    r.update(x, example_ids=torch.tensor([9, 4]))
    res = r.result()
    assert res["example_ids"][:, 0].tolist() == [4, 4, 4]
    assert res["positions"][:, 0].tolist() == [0, 1, 2]
    later = TopK(3)
    later.update(torch.ones(1, 2, 1), example_ids=torch.tensor([1]))
    res = r.merge(later).result()
    assert res["example_ids"][:, 0].tolist() == [1, 1, 4]
    assert res["positions"][:, 0].tolist() == [0, 1, 0]


def test_topk_orders_a_repeated_example_id_by_position_across_rows():
    r = TopK(2)
    r.update(torch.ones(2, 2, 1), example_ids=torch.tensor([5, 5]))  # same id in two rows
    res = r.result()
    assert res["example_ids"][:, 0].tolist() == [5, 5]
    assert res["positions"][:, 0].tolist() == [0, 0]


def test_topk_accepts_half_precision_and_keeps_values_exact():
    x = torch.randn(4, 6, 3).to(torch.bfloat16)
    r = TopK(5, largest=False)
    r.update(x, example_ids=torch.arange(4))
    ids = np.arange(4)
    (values, _, _), _ = topk_reference(x.double().numpy(), ids, None, 5, False)
    np.testing.assert_array_equal(r.result()["values"].numpy(), values)


# ----- persistence ------------------------------------------------------------------------
def all_reducers() -> list[Reducer]:
    return [
        Mean(),
        Variance(),
        Covariance(),
        Histogram(5, -1.0, 1.5),
        Histogram(3, 0, 1, False),
        MinMax(),
        TopK(3),
        TopK(2, largest=False),
    ]


def fill(r: Reducer, x: torch.Tensor) -> None:
    r.update(x, example_ids=torch.arange(x.shape[0]) + 100)


def through_wire(state: dict) -> dict:
    """Tensors as raw bytes and back, plain values untouched: what a codec does."""
    out = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            raw = bytearray(value.contiguous().numpy().tobytes())
            out[key] = (
                torch.frombuffer(raw, dtype=value.dtype).reshape(value.shape)
                if raw
                else torch.zeros(value.shape, dtype=value.dtype)
            )
        else:
            assert value is None or isinstance(value, (int, float, str, bool)), (key, value)
            out[key] = value
    return out


def assert_same_result(a: Reducer, b: Reducer) -> None:
    assert_same_result_dicts(a.result(), b.result())


@pytest.mark.parametrize("reducer", all_reducers(), ids=lambda r: repr(r))
def test_state_dict_round_trip_then_keeps_going(reducer):
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 5, generator=gen) for _ in range(3)]
    # empty, after one batch: both must rebuild.
    for r in (reducer.empty_like(), reducer):
        rebuilt = reducer_from_state(through_wire(r.state_dict()))
        assert type(rebuilt) is type(r) and rebuilt.config() == r.config()
        assert rebuilt.d == r.d and rebuilt.count == r.count
        assert_same_result(rebuilt, r)
        fill(r, batches[0])
    rebuilt = reducer_from_state(through_wire(reducer.state_dict()))
    for x in batches[1:]:
        fill(reducer, x)
        fill(rebuilt, x)
    assert_same_result(rebuilt, reducer)
    assert reducer.nbytes == sum(
        v.numel() * v.element_size()
        for v in reducer.state_dict().values()
        if isinstance(v, torch.Tensor)
    )


def test_state_dict_fits_safetensors(tmp_path):
    r = TopK(2)
    fill(r, torch.randn(3, 4, 2))
    state = r.state_dict()
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    plain = {k: v for k, v in state.items() if not isinstance(v, torch.Tensor)}
    path = tmp_path / "r.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"plain": json.dumps(plain)})
    loaded: dict = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        loaded.update(json.loads(f.metadata()["plain"]))
    assert_same_result(reducer_from_state(loaded), r)


def test_registry_knows_every_kind():
    assert {type(r).kind for r in all_reducers()} <= set(REDUCERS)
    assert REDUCERS["variance"] is Variance


@pytest.mark.parametrize(
    "state",
    [
        {"kind": "median"},
        {"kind": None},
        {**Mean().state_dict(), "d": 3, "count": 2, "mean": torch.zeros(4)},
        {**Mean().state_dict(), "d": 3, "count": 2},
        {**Histogram(2, 0, 1).state_dict(), "bins": None},
        {
            **TopK(2).state_dict(),
            "d": 1,
            "count": 5,
            "values": torch.zeros(1, 1),
            "example_ids": torch.zeros(1, 1),
            "positions": torch.zeros(1, 1),
        },
    ],
)
def test_bad_states_are_refused(state):
    with pytest.raises(UsageError):
        reducer_from_state(state)


# ----- empties and identities ---------------------------------------------------------------
@pytest.mark.parametrize("reducer", all_reducers(), ids=lambda r: repr(r))
def test_fully_masked_update_fixes_d_and_reports_count_zero(reducer):
    reducer.update(
        torch.randn(2, 3, 4), mask=torch.zeros(2, 3, dtype=torch.bool), example_ids=torch.arange(2)
    )
    assert reducer.d == 4 and reducer.count == 0
    res = reducer.result()
    assert res["count"].item() == 0
    for key in ("mean", "var", "min", "max", "cov"):
        if key in res:
            assert res[key].shape[0] == 4 and torch.isnan(res[key]).all()
    if "values" in res:
        assert res["values"].shape == (0, 4)
    with pytest.raises(UsageError, match="d=4"):
        reducer.update(torch.randn(2, 5), example_ids=torch.arange(2))


@pytest.mark.parametrize("reducer", all_reducers(), ids=lambda r: repr(r))
def test_empty_merges_as_identity_both_ways(reducer):
    fill(reducer, torch.randn(3, 2, 4))
    before = reducer_from_state(reducer.state_dict())
    assert reducer.merge(reducer.empty_like()) is reducer
    assert_same_result(reducer, before)
    fresh = reducer.empty_like().merge(reducer)
    assert_same_result(fresh, before)
    # The merge copied: updating the result leaves the source alone.
    fill(fresh, torch.randn(3, 2, 4))
    assert_same_result(reducer, before)


@pytest.mark.parametrize("reducer", all_reducers(), ids=lambda r: repr(r))
def test_results_are_copies_of_the_state(reducer):
    fill(reducer, torch.randn(3, 2, 4))
    before = reducer.result()
    for value in reducer.result().values():
        value.zero_()
    assert_same_result_dicts(reducer.result(), before)


def assert_same_result_dicts(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=0, equal_nan=True)


def test_update_leaves_the_input_untouched():
    x = torch.randn(5, 3, dtype=torch.float64)
    copy = x.clone()
    for r in all_reducers():
        fill(r, x)
    assert torch.equal(x, copy)


# ----- usage errors -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Histogram(4, 0, 1), Histogram(5, 0, 1)),
        (Histogram(4, 0, 1), Histogram(4, 0, 2)),
        (Histogram(4, 0, 1), Histogram(4, 0, 1, per_unit=False)),
        (TopK(3), TopK(4)),
        (TopK(3), TopK(3, largest=False)),
        (Mean(), Variance()),
    ],
)
def test_mismatched_configs_refuse_to_merge(a, b):
    with pytest.raises(UsageError) as info:
        a.merge(b)
    message = str(info.value)
    assert repr(a).split("(")[0] in message and repr(b).split("(")[0] in message


def test_merge_names_both_configs():
    with pytest.raises(UsageError, match=r"Histogram\(bins=4.*Histogram\(bins=5"):
        Histogram(4, 0, 1).merge(Histogram(5, 0, 1))


def test_merging_different_unit_counts_is_refused():
    a, b = Variance(), Variance()
    a.update(torch.randn(3, 4))
    b.update(torch.randn(3, 5))
    with pytest.raises(UsageError, match="4 != 5"):
        a.merge(b)


def test_merging_a_non_reducer_is_refused():
    with pytest.raises(UsageError, match="not a reducer"):
        Mean().merge({"kind": "mean"})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "make",
    [
        lambda: TopK(0),
        lambda: TopK(2.0),
        lambda: TopK(True),
        lambda: TopK(2, largest="yes"),
        lambda: Histogram(0, 0, 1),
        lambda: Histogram(3, 1, 1),
        lambda: Histogram(3, 2, 1),
        lambda: Histogram(3, float("nan"), 1),
        lambda: Histogram(3, 0, float("inf")),
        lambda: Histogram(3, 0, 1, per_unit=1),
    ],
)
def test_bad_arguments_are_refused(make):
    with pytest.raises(UsageError):
        make()


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (lambda r: r.update(torch.tensor(1.0)), "0-d"),
        (lambda r: r.update(torch.zeros(3, 0)), "no units"),
        (lambda r: r.update(torch.zeros(3, 2), mask=torch.ones(2, dtype=torch.bool)), "mask"),
        (lambda r: r.update(torch.zeros(3, 2), mask=torch.ones(3)), "bool"),
        (lambda r: r.update([[1.0, 2.0]]), "torch.Tensor"),
    ],
)
def test_bad_updates_are_refused(update, match):
    with pytest.raises(UsageError, match=match):
        update(Variance())


@pytest.mark.parametrize(
    ("update", "match"),
    [
        (lambda r: r.update(torch.zeros(2, 3)), "example_ids"),
        (lambda r: r.update(torch.zeros(2, 3, 4, 5), example_ids=torch.arange(2)), "batch, seq"),
        (lambda r: r.update(torch.zeros(2, 3), example_ids=torch.arange(3)), r"\(2,\)"),
        (lambda r: r.update(torch.zeros(2, 3), example_ids=torch.zeros(2)), "integers"),
        (
            lambda r: r.update(
                torch.zeros(2, 3, 4),
                example_ids=torch.arange(2),
                mask=torch.ones(2, dtype=torch.bool),
            ),
            "mask",
        ),
    ],
)
def test_bad_topk_updates_are_refused(update, match):
    with pytest.raises(UsageError, match=match):
        update(TopK(2))


# ----- devices ------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_state_stays_on_the_input_device_and_merge_moves_the_other():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 3, generator=gen)
    for make in (Mean, Variance, Covariance, MinMax, lambda: Histogram(4, -1, 1), lambda: TopK(4)):
        on_gpu, on_cpu, reference = make(), make(), make()
        on_gpu.update(x[:3].cuda(), example_ids=torch.arange(3).cuda())
        on_cpu.update(x[3:], example_ids=torch.arange(3, 6))
        assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
        on_gpu.merge(on_cpu)
        assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu"
        reference.update(x, example_ids=torch.arange(6))
        for key, value in on_gpu.result().items():
            assert value.device.type == "cpu"
            torch.testing.assert_close(value, reference.result()[key], equal_nan=True)
