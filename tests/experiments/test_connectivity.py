"""Weight-based connectivity against explicit matrix products on the loaded weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloche import experiments as ex


def w(model, name: str) -> torch.Tensor:
    return model.param(name).double()


def head_weight(model, layer: int, name: str, head: int) -> torch.Tensor:
    t = w(model, f"layers.{layer}.attn.{name}")
    return t[head // (model.n_heads // t.shape[0])]


def test_virtual_weights_equal_matrix_products(model):
    got = ex.virtual_weights(model, 0, 1)
    want = (w(model, "layers.0.mlp.W_out") @ w(model, "layers.1.mlp.W_in")).numpy()
    assert got.shape == (model.d_mlp, model.d_mlp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    folded = ex.virtual_weights(model, 0, 1, fold_ln=True)
    ln = w(model, "layers.1.ln2.w")
    np.testing.assert_allclose(folded, (w(model, "layers.0.mlp.W_out") @ torch.diag(ln)
                                        @ w(model, "layers.1.mlp.W_in")).numpy(),
                               rtol=1e-5, atol=1e-6)
    out_row = w(model, "layers.0.mlp.W_out")[3]
    every = [(layer, n, float(v)) for layer in range(1, model.n_layers)
             for n, v in enumerate(out_row @ w(model, f"layers.{layer}.mlp.W_in"))]
    every.sort(key=lambda t: -abs(t[2]))
    top = ex.top_connections(model, 0, 3, k=4)
    assert [(layer, n) for layer, n, _ in top] == [(layer, n) for layer, n, _ in every[:4]]
    assert [v for _, _, v in top] == pytest.approx([v for _, _, v in every[:4]], rel=1e-6)
    up = ex.top_connections(model, 1, 2, k=3, direction="upstream")
    assert [(layer, n) for layer, n, _ in up] == [
        (0, int(n)) for n in np.argsort(-np.abs(want[:, 2]), kind="stable")[:3]]


def test_ov_and_qk_circuits_equal_dense_products(model):
    layer, head = 1, 3
    w_e, w_u = w(model, "embed.W_E"), w(model, "unembed.W_U")
    ov = ex.ov_circuit(model, layer, head)
    v_o = head_weight(model, layer, "W_V", head) @ head_weight(model, layer, "W_O", head)
    assert ov.shape == (model.d_vocab, model.d_vocab)
    for token in (3, 17):
        np.testing.assert_allclose(ov.row(token), (w_e[token] @ v_o @ w_u).numpy(), rtol=1e-4,
                                   atol=1e-5)
    qk = ex.qk_circuit(model, layer, head)
    keys = w_e @ head_weight(model, layer, "W_K", head)
    want = w_e @ head_weight(model, layer, "W_Q", head) @ keys[5]
    np.testing.assert_allclose(qk.column(5), want.numpy(), rtol=1e-4, atol=1e-5)
    eig = ov.eigenvalues()
    if model.d_vocab <= 512:  # the factored spectrum is the dense one's non-zero part
        dense_eig = np.linalg.eigvals((w_e @ v_o @ w_u).numpy())
        top = np.sort(np.abs(dense_eig))[-len(eig):]
        np.testing.assert_allclose(np.sort(np.abs(eig)), top, rtol=1e-3, atol=1e-5)
    trace = float(torch.einsum("vd,dv->", w_e @ v_o, w_u))  # sum of eigenvalues = trace
    assert float(np.sum(eig).real) == pytest.approx(trace, rel=1e-4, abs=1e-5)


def test_composition_scores_equal_dense_definition(model):
    scores = ex.composition_scores(model)
    n_l, n_h = model.n_layers, model.n_heads
    assert set(scores) == {"Q", "K", "V"}
    for s in scores.values():
        assert s.shape == (n_l, n_h, n_l, n_h)
        assert np.isnan(s[1, :, 0, :]).all() and np.isnan(s[0, :, 0, :]).all()

    def ov(layer, h):
        return head_weight(model, layer, "W_V", h) @ head_weight(model, layer, "W_O", h)

    def qk(layer, h):
        return head_weight(model, layer, "W_Q", h) @ head_weight(model, layer, "W_K", h).T

    def comp(a, b):
        return float((a @ b).norm() / (a.norm() * b.norm()))

    for h1, h2 in [(0, 0), (1, 3), (3, 2)]:
        a = ov(0, h1)
        assert scores["Q"][0, h1, 1, h2] == pytest.approx(comp(a, qk(1, h2)), rel=1e-6)
        assert scores["K"][0, h1, 1, h2] == pytest.approx(comp(a, qk(1, h2).T), rel=1e-6)
        assert scores["V"][0, h1, 1, h2] == pytest.approx(comp(a, ov(1, h2)), rel=1e-6)


def test_logit_effect_and_summary(model):
    effect = ex.logit_effect(model, ("layers.1.mlp.post", 6), k=3)
    direct = (w(model, "layers.1.mlp.W_out")[6] @ w(model, "unembed.W_U")).numpy()
    assert [v for _, v in effect["top"]] == pytest.approx(np.sort(direct)[::-1][:3].tolist(),
                                                          rel=1e-5)
    assert [v for _, v in effect["bottom"]] == pytest.approx(np.sort(direct)[:3].tolist(),
                                                             rel=1e-5)
    summary = ex.connectivity_summary(model)
    names = {f"L{i}.{c}" for i in range(model.n_layers) for c in ("attn", "mlp")}
    assert set(summary["nodes"]) == names | {"embed", "unembed"}
    edges = {(a, b): s for a, b, s in summary["edges"]}
    assert ("embed", "unembed") in edges and ("L1.mlp", "L0.attn") not in edges
    w_out, w_in = w(model, "layers.0.mlp.W_out"), w(model, "layers.1.mlp.W_in")
    if "layers.1.mlp.W_gate" in model.param_names():
        w_in = torch.cat([w_in, w(model, "layers.1.mlp.W_gate")], 1)
    want = float((w_out @ w_in).norm() / (w_out.norm() * w_in.norm()))
    assert edges[("L0.mlp", "L1.mlp")] == pytest.approx(want, rel=1e-6)
