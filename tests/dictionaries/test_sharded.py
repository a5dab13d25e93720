"""Dictionaries on a model sharded over 2 gloo ranks: each lives on the rank of its point."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.sharding.launch import start_local

from tests.dictionaries import checks
from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tiny4_dir):
    directory = tiny4_dir("llama")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()


@pytest.mark.parametrize("point", ["layers.0.resid_post", "layers.3.resid_pre"])
def test_dictionary_on_the_rank_of_its_point(pair, point):
    local, sharded = pair
    sae = checks.make_dictionary(sharded.d_model)
    summary = sharded.attach_dictionary("d", sae, point=point)
    local.attach_dictionary("d", sae, point=point)
    try:
        owner = sharded.owner_of(point)
        assert summary["rank"] == owner == sharded.owner_of("dict:d:features")
        inputs = ids_batch(seed=5)["input_ids"]
        checks.reads_are_bit_identical(sharded, "d", inputs)
        checks.edit_matches_manual(sharded, "d", sae, inputs)
        checks.splice_and_error_edits(sharded, "d", sae, inputs)
        # the sharded model's features are the single-process model's
        got = sharded.run(inputs, probes={"dict:d:features": checks.keep}, save="f")
        want = local.run(inputs, probes={"dict:d:features": checks.keep}, save="f")
        torch.testing.assert_close(got.logits, want.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(sharded.save_context("f").fetch("dict:d:features"),
                                   local.save_context("f").fetch("dict:d:features"),
                                   atol=1e-5, rtol=0)
        edited = sharded.run(inputs, probes={"dict:d:features": checks.zero_some}).logits
        torch.testing.assert_close(
            edited, local.run(inputs, probes={"dict:d:features": checks.zero_some}).logits,
            atol=1e-5, rtol=0)
        points = {p.name: p for p in sharded.probe_points()}
        assert points["dict:d:features"].shape == ("batch", "seq", 4 * sharded.d_model)
        # where the module is: only on its rank
        held = sharded.call(lambda m: m.dictionaries()["d"]["rank"], rank="all")
        assert held == {0: owner, 1: owner}
    finally:
        sharded.save_context("f").clear()
        local.save_context("f").clear()
        sharded.detach_dictionary("d")
        local.detach_dictionary("d")
    assert "d" not in sharded.dictionaries()
    with pytest.raises(cloche.UnknownProbePoint):
        sharded.run(ids_batch()["input_ids"], probes={"dict:d:features": checks.keep})


def test_dataset_reducers_on_sharded_features(pair):
    _, sharded = pair
    sae = checks.make_dictionary(sharded.d_model)
    sharded.attach_dictionary("t", sae, point="layers.2.mlp.out")
    try:
        examples = [torch.arange(5, 5 + n) for n in (4, 3, 5, 6)]
        checks.reducers_on_features(sharded, "t", Dataset(examples, name="ids", seq_len=6,
                                                          pad_id=2))
    finally:
        sharded.detach_dictionary("t")


def test_a_transcoder_on_the_rank_of_its_points(pair):
    local, sharded = pair
    from cloche.dictionaries import DictionaryConfig, SparseDictionary

    torch.manual_seed(2)
    d = sharded.d_model
    tc = SparseDictionary(DictionaryConfig(d_in=d, d_sae=4 * d, d_out=d,
                                           architecture="transcoder"))
    with torch.no_grad():
        tc.W_enc.normal_()
    summary = sharded.attach_dictionary("tc", tc, point="layers.3.ln2",
                                        out_point="layers.3.mlp.out")
    local.attach_dictionary("tc", tc, point="layers.3.ln2", out_point="layers.3.mlp.out")
    try:
        assert summary["rank"] == sharded.owner_of("layers.3.mlp.out") == 1
        inputs = ids_batch(seed=7)["input_ids"]
        checks.reads_are_bit_identical(sharded, "tc", inputs)
        edited = sharded.run(inputs, probes={"dict:tc:features": checks.zero_some}).logits
        torch.testing.assert_close(
            edited, local.run(inputs, probes={"dict:tc:features": checks.zero_some}).logits,
            atol=1e-5, rtol=0)
        assert not torch.equal(edited, sharded.run(inputs).logits)
        with pytest.raises(cloche.UsageError, match="both must be on one rank"):
            sharded.attach_dictionary("across", tc, point="layers.1.ln2",
                                      out_point="layers.2.mlp.out")
    finally:
        sharded.detach_dictionary("tc")
        local.detach_dictionary("tc")
