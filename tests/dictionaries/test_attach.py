"""Dictionaries as probe points, on a model in this process and on a real server."""

from __future__ import annotations

import uuid

import cloche
import pytest
import torch
from cloche.dictionaries import SparseDictionary

from tests.dictionaries import checks

TEXTS = ["the cat sat on the mat", "a dog ran", "hello world, hello again", "the end"]


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir)


@pytest.fixture(params=["local", "remote"])
def where(request, local_model, served):
    """(model, dictionary name, dictionary): attached for the test, detached after it."""
    model = (local_model if request.param == "local"
             else cloche.connect(served.address, token=served.token))
    name = f"r{uuid.uuid4().hex[:6]}"
    sae = checks.make_dictionary(model.d_model, hook_name="blocks.1.hook_resid_pre")
    summary = model.attach_dictionary(name, sae)
    try:
        assert summary["point"] == "layers.1.resid_pre"  # the TransformerLens hook_name
        yield model, name, sae
    finally:
        model.detach_dictionary(name)
        if request.param == "remote":
            model.close()


def test_dictionary_points_are_listed_and_owned(where):
    model, name, _ = where
    points = {p.name: p for p in model.probe_points()}
    features = points[f"dict:{name}:features"]
    assert features.shape == ("batch", "seq", 4 * model.d_model)
    assert points[f"dict:{name}:error"].shape == ("batch", "seq", model.d_model)
    assert model.owner_of(f"dict:{name}:features") == 0
    assert model.dictionaries()[name]["architecture"] == "topk"


def test_reading_features_leaves_the_run_bit_identical(where):
    model, name, _ = where
    checks.reads_are_bit_identical(model, name, TEXTS[:2])


def test_feature_edit_matches_the_manual_computation(where):
    model, name, sae = where
    checks.edit_matches_manual(model, name, sae, TEXTS[:2])


def test_zero_error_splices_the_reconstruction_in(where):
    model, name, sae = where
    checks.splice_and_error_edits(model, name, sae, TEXTS[:2])


def test_reducers_and_top_examples_on_features(where):
    model, name, _ = where
    checks.reducers_on_features(model, name, TEXTS)
    top = cloche.experiments.top_examples(model, f"dict:{name}:features", 3, TEXTS, k=2)
    assert top is not None


def test_dictionary_weights_are_read_by_name(where):
    model, name, sae = where
    torch.testing.assert_close(model.param(f"dict:{name}:W_enc"), sae.W_enc.detach())
    torch.testing.assert_close(model.param(f"dict:{name}:W_enc", index=(slice(None), [3, 1])),
                               sae.W_enc.detach()[:, [3, 1]])
    torch.testing.assert_close(model.param(f"dict:{name}:b_dec"), sae.b_dec.detach())
    with pytest.raises(cloche.UsageError, match="no weight 'nope'"):
        model.param(f"dict:{name}:nope")
    with pytest.raises(cloche.UsageError, match="no dictionary named 'absent'"):
        model.param("dict:absent:W_enc")
    with pytest.raises(cloche.UsageError, match="no gradients"):
        model.param(f"dict:{name}:W_enc", grad=True)


def test_detached_dictionary_points_are_gone(local_model):
    sae = checks.make_dictionary(local_model.d_model)
    local_model.attach_dictionary("gone", sae, point="layers.0.resid_post")
    local_model.detach_dictionary("gone")
    with pytest.raises(cloche.UnknownProbePoint):
        local_model.run("hi", probes={"dict:gone:features": checks.keep})
    assert "gone" not in local_model.dictionaries()


def test_unknown_dictionary_points_and_bad_sources_are_clear_errors(local_model):
    with pytest.raises(cloche.UnknownProbePoint, match="dict:nope:features"):
        local_model.run("hi", probes={"dict:nope:features": checks.keep})
    with pytest.raises(cloche.UsageError, match="expects 7 values"):
        local_model.attach_dictionary("bad", checks.make_dictionary(7), point="layers.0.resid_post")
    with pytest.raises(cloche.UsageError, match="hook_name"):
        local_model.attach_dictionary("bad", checks.make_dictionary(local_model.d_model))
    assert "bad" not in local_model.dictionaries()
    local_model.run("still runs")


def test_gradient_probes_see_the_feature_gradient(local_model):
    sae = checks.make_dictionary(local_model.d_model, architecture="standard")
    local_model.attach_dictionary("g", sae, point="layers.0.resid_post")
    try:
        out = local_model.run(TEXTS[:1], probes={}, backward=True, save="grads",
                              grad_probes={"dict:g:features": checks.keep,
                                           "layers.0.resid_post": checks.keep})
        saved = local_model.save_context("grads")
        g_features = saved.fetch("dict:g:features")[0]
        g_out = saved.fetch("layers.0.resid_post")[0]
        torch.testing.assert_close(g_features, g_out @ sae.W_dec.detach().T)
        assert out.loss is not None
        saved.clear()
    finally:
        local_model.detach_dictionary("g")


def test_saelens_folder_and_tensor_dict_sources(local_model, tmp_path):
    sae = checks.make_dictionary(local_model.d_model, architecture="jumprelu",
                                 hook_name="blocks.0.hook_resid_post")
    sae.save(tmp_path / "sae")
    for name, source, extra in (("folder", tmp_path / "sae", {}),
                                ("tensors", sae.weights(), {"point": "blocks.0.hook_resid_post"}),
                                ("there", tmp_path / "sae", {"on_server": True})):
        summary = local_model.attach_dictionary(name, source, **extra)
        assert summary["point"] == "layers.0.resid_post" and summary["architecture"] == "jumprelu"
    ids = local_model.tokenize(TEXTS[0])
    got = {}

    def grab(ctx, x):
        got[ctx.point] = x.clone()

    local_model.run(ids, probes={f"dict:{n}:features": grab
                                 for n in ("folder", "tensors", "there")})
    assert bool((got["dict:folder:features"] > 0).any())
    assert torch.equal(got["dict:folder:features"], got["dict:tensors:features"])
    assert torch.equal(got["dict:folder:features"], got["dict:there:features"])
    for name in ("folder", "tensors", "there"):
        local_model.detach_dictionary(name)


def test_conventions_that_differ_are_named(local_model):
    sae = checks.make_dictionary(local_model.d_model)
    tokenizer = local_model.tokenizer
    adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    sae.config = sae.config.replace(prepend_bos=not adds_bos, context_size=16)
    with pytest.warns(UserWarning, match="prepend_bos|contexts") as record:
        summary = local_model.attach_dictionary("conv", sae, point="layers.0.resid_post")
    assert any(f"prepend_bos={not adds_bos}" in str(w.message) for w in record)
    assert any("contexts of 16 tokens" in str(w.message) for w in record)
    assert len(summary["notes"]) == 2
    local_model.detach_dictionary("conv")
    try:  # applying the dictionary's conventions sets the model's
        with pytest.warns(UserWarning, match="contexts of 16") as record:
            local_model.attach_dictionary("conv", sae, point="layers.0.resid_post",
                                          apply_conventions=True)
        assert not any("prepend_bos" in str(w.message) for w in record)
        assert local_model.prepend_bos is (not adds_bos)
    finally:
        local_model.prepend_bos = None
        local_model.detach_dictionary("conv")
    assert isinstance(sae, SparseDictionary)


def test_ablation_steering_and_generation_on_features(where):
    model, name, sae = where
    result = cloche.experiments.ablate(model, (f"dict:{name}:features", list(range(40))),
                                       TEXTS[:2])
    assert result.loss_ablated != result.loss_clean
    # steering along a decoder direction = raising that feature
    direction = sae.W_dec.detach()[5]

    def raise_feature(ctx, f):
        f[..., 5] += 4.0

    def steer(ctx, r):
        return r + 4.0 * direction

    raised = model.run(TEXTS[:1], probes={f"dict:{name}:features": raise_feature}).logits
    steered = model.run(TEXTS[:1], probes={f"dict:{name}:reconstruction": steer}).logits
    torch.testing.assert_close(raised, steered, atol=1e-4, rtol=0)
    plain = model.generate(TEXTS[0], 6).tokens
    read = model.generate(TEXTS[0], 6, probes={f"dict:{name}:features": checks.keep},
                          save="dict-gen").tokens
    assert torch.equal(plain, read)
    model.save_context("dict-gen").clear()


def test_a_dictionary_attached_by_another_client_is_found(served):
    with cloche.connect(served.address, token=served.token) as first, \
            cloche.connect(served.address, token=served.token) as second:
        second.probe_points()  # described before the dictionary existed
        sae = checks.make_dictionary(first.d_model)
        first.attach_dictionary("shared", sae, point="layers.0.resid_post")
        try:
            out = second.run("hello", probes={"dict:shared:features": checks.keep},
                             save="shared")
            assert out.logits is not None
            assert second.save_context("shared").keys() == ["dict:shared:features"]
            second.save_context("shared").clear()
        finally:
            first.detach_dictionary("shared")


def test_a_transcoder_reads_the_mlp_input_and_rewrites_its_output(where):
    model, _, _ = where
    from cloche.dictionaries import DictionaryConfig

    torch.manual_seed(3)
    d = model.d_model
    config = DictionaryConfig(d_in=d, d_sae=4 * d, d_out=d, architecture="skip_transcoder",
                              hook_name="layers.0.ln2", hook_name_out="blocks.0.hook_mlp_out")
    tc = SparseDictionary(config)
    with torch.no_grad():
        tc.W_enc.normal_()
        tc.W_skip.normal_(std=0.1)
    summary = model.attach_dictionary("tc", tc)
    try:
        assert (summary["point"], summary["out_point"]) == ("layers.0.ln2", "layers.0.mlp.out")
        points = {p.name: p for p in model.probe_points()}
        assert points["dict:tc:features"].shape == ("batch", "seq", 4 * d)
        checks.reads_are_bit_identical(model, "tc", TEXTS[:2])
        def keep_input(ctx, x):  # (the run's state: shared by its probes, also on a server)
            ctx.state["tc-input"] = x

        def by_hand(ctx, y):
            x = ctx.state.pop("tc-input")
            features = tc.encode(x)
            error = y - tc.decode(features, x).to(y.dtype)
            edited = features.clone()
            edited[..., checks.EDITED] = 0
            return tc.decode(edited, x).to(y.dtype) + error

        edited = model.run(TEXTS[:2], probes={"dict:tc:features": checks.zero_some}).logits
        manual = model.run(TEXTS[:2], probes={"layers.0.ln2": keep_input,
                                              "layers.0.mlp.out": by_hand}, save="tc").logits
        assert torch.equal(edited, manual)
        assert not torch.equal(edited, model.run(TEXTS[:2]).logits)
    finally:
        model.detach_dictionary("tc")


def test_the_server_checks_attach_requests_and_keeps_serving(served):
    from cloche.api import requests as rq
    from cloche.dictionaries import build_dictionary

    sae = checks.make_dictionary(8)
    good = {"name": "x", "point": "layers.0.resid_post", "build": build_dictionary,
            "config": sae.config.to_cfg(), "weights": sae.weights()}
    with cloche.connect(served.address, token=served.token) as model:
        for change, field in (({"name": "a:b"}, "name"), ({"point": "nowhere"}, "point"),
                              ({"weights": {"W_enc": [1, 2]}}, "weights"),
                              ({"config": None}, "config")):
            with pytest.raises(cloche.UsageError, match=f"AttachDictionary.{field}"):
                model.executor.execute(rq.AttachDictionary(**{**good, **change}))
        with pytest.raises(cloche.UsageError, match="expects 8 values"):
            model.executor.execute(rq.AttachDictionary(**good))  # d_model is not 8
        assert model.dictionaries() == {} or "x" not in model.dictionaries()
        assert model.run("still serving").logits is not None
