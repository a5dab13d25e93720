"""Activation statistics, PCA, samples and projections against local computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloche import experiments as ex
from sklearn.decomposition import PCA as SkPCA

from tests.experiments.helpers import activations_by_example, random_dataset


@pytest.mark.parametrize("point", ["layers.0.resid_post", "layers.1.attn.z"])
def test_pca_from_server_covariance_matches_sklearn(model, point):
    ds = random_dataset(model, n=14, seed=11)
    acts = torch.cat([a.flatten(1) for a in activations_by_example(model, point, ds)])
    collected = acts.double().numpy()
    got = ex.pca(model, point, ds, n_components=5, batch_size=4)
    ref = SkPCA(n_components=5, svd_solver="full").fit(collected)
    assert got.components.shape == (5, collected.shape[1]) and got.count == len(collected)
    np.testing.assert_allclose(got.explained_variance, ref.explained_variance_, rtol=1e-4)
    np.testing.assert_allclose(got.explained_variance_ratio, ref.explained_variance_ratio_,
                               rtol=1e-4)
    np.testing.assert_allclose(got.mean, ref.mean_, rtol=1e-5, atol=1e-6)
    overlap = np.abs(np.sum(got.components * ref.components_, axis=1))  # equal up to sign
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)
    np.testing.assert_allclose(np.abs(got.transform(collected[:7])),
                               np.abs(ref.transform(collected[:7])), rtol=1e-3, atol=1e-4)


def test_projection_of_texts_equals_local_transform(model):
    ds = random_dataset(model, n=6, seed=2)
    point = "layers.1.resid_mid"
    result = ex.pca(model, point, ds, n_components=3)
    ids = torch.randint(3, model.d_vocab, (2, 5), generator=torch.Generator().manual_seed(9))
    projected = ex.project(model, result, ids)
    name = "test/proj"
    model.run(ids, probes={point: lambda c, x: c.save("x", x)}, save=name)
    acts = model.save_context(name).fetch("x")[0].double().numpy()
    model.save_context(name).clear()
    np.testing.assert_allclose(projected["values"], result.transform(acts), rtol=1e-4, atol=1e-5)


def test_mean_and_covariance_equal_brute_force(model):
    ds = random_dataset(model, n=8, seed=4)
    point = "layers.0.mlp.out"
    acts = torch.cat(activations_by_example(model, point, ds)).double().numpy()
    np.testing.assert_allclose(ex.mean(model, point, ds), acts.mean(0), rtol=1e-5, atol=1e-6)
    cov = ex.covariance(model, point, ds, batch_size=3)
    np.testing.assert_allclose(cov["cov_sample"], np.cov(acts, rowvar=False), rtol=1e-4,
                               atol=1e-6)


def test_sample_is_exact_rows_and_independent_of_batching(model):
    ds = random_dataset(model, n=10, seed=8)
    point = "layers.0.resid_post"
    acts = activations_by_example(model, point, ds)
    a = ex.sample(model, point, ds, n=25, batch_size=3, seed=1)
    b = ex.sample(model, point, ds, n=25, batch_size=10, seed=1)
    assert len(a.activations) == 25
    np.testing.assert_array_equal(a.example_ids, b.example_ids)
    np.testing.assert_array_equal(a.positions, b.positions)
    for row, i, p in zip(a.activations, a.example_ids, a.positions):
        np.testing.assert_allclose(row, acts[int(i)][int(p)].numpy(), rtol=1e-5, atol=1e-6)
    assert len(set(zip(a.example_ids.tolist(), a.positions.tolist()))) == 25
    other = ex.sample(model, point, ds, n=25, batch_size=3, seed=2)
    assert set(zip(other.example_ids.tolist(), other.positions.tolist())) != set(
        zip(a.example_ids.tolist(), a.positions.tolist()))
