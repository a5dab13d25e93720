"""The parity battery on tiny models of several families: it passes where cloche is right, and
it fails (naming the check and the point) where an adapter site or a weight mapping is wrong."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from cloche.check import FAIL, PASS, SKIP, check, compare, token_inputs, tolerance
from cloche.model import families
from cloche.model.families import Site, WeightRule

from tests.tiny_models import FAMILIES, MOE, VOCAB

SHARDED = "sharded == single process"


def statuses(report):
    return {row.check: (row.status, row.reason) for row in report.rows}


# every tiny family: GPT-2, Llama with grouped-query attention, mixtures of experts, parallel
# blocks, encoders, ALiBi, soft-capping, ...
@pytest.mark.parametrize("family", FAMILIES)
def test_the_battery_passes_on_every_family(family, tiny_dir):
    report = check(tiny_dir(family))
    skipped = {name for name, (status, _) in statuses(report).items() if status == SKIP}
    expected = {SHARDED}
    if family in ("bert", "roberta"):  # encoders: post-norm blocks, no next-token loss
        expected |= {"resid_post == resid_pre + attn.out + mlp.out", "gradient probes == autograd"}
    if family == "falcon_rw":  # transformers' eager ALiBi is not the model's attention
        expected |= {"attn.pattern == output_attentions (eager)"}
    assert report.ok, report.table()
    assert skipped == expected, report.table()
    checks = set(statuses(report))
    assert {"no-probe run == transformers", "residual stream == output_hidden_states",
            "attn.pattern == output_attentions (eager)", "head ablation == W_O edit",
            "TransformerLens aliases name their points"} <= checks
    assert ("expert neuron ablation == expert W_out edit" in checks) == (family in MOE)
    assert ("neuron ablation == W_out edit" in checks) == (family not in MOE)
    if family in ("phi", "gptj", "falcon"):  # parallel blocks: the three-term identity
        assert statuses(report)["resid_post == resid_pre + attn.out + mlp.out"][0] == PASS
    if family in ("gpt2", "llama", "opt"):  # sequential blocks: resid_mid's gradient too
        grads = next(r for r in report.rows if r.check == "gradient probes == autograd")
        assert grads.points == "layers.*.resid_pre (2), layers.*.resid_mid (2)"
    for row in report.rows:
        if row.status == PASS and row.max_diff is not None:
            assert row.max_diff <= row.tolerance, row


def test_a_model_of_an_unknown_family_skips_what_it_lacks_and_says_why(tmp_path):
    """XGLM has no adapter; discovery proves its residual stream only: the rest is SKIP, with
    the reason its description gives."""
    config = transformers.XGLMConfig(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                     max_position_embeddings=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    transformers.XGLMForCausalLM(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="'xglm' has no cloche adapter"):
        report = check(tmp_path)
    assert report.ok, report.table()
    got = statuses(report)
    assert got["residual stream == output_hidden_states"][0] == PASS
    assert got["gradient probes == autograd"][0] == PASS
    status, reason = got["attn.pattern == output_attentions (eager)"]
    assert status == SKIP and "AttentionInterface" in reason
    status, reason = got["neuron ablation == W_out edit"]
    assert status == SKIP and reason.startswith("layers.*.mlp.post: ")


def _patched(monkeypatch, model_type, **changes):
    """The family's adapter with some sites or weights changed, for every load that follows."""
    adapter = families.adapter_for(model_type)
    monkeypatch.setitem(families._BY_TYPE, model_type, dataclasses.replace(adapter, **changes))


def test_an_adapter_site_on_the_wrong_module_fails(monkeypatch, tiny_dir):
    """attn.out read at the input of the output projection (z, not its projection)."""
    gpt2 = families.adapter_for("gpt2")
    _patched(monkeypatch, "gpt2", block_sites={**gpt2.block_sites,
                                               "attn.out": Site("attn.c_proj", "input")})
    report = check(tiny_dir("gpt2"))
    assert not report.ok
    got = statuses(report)
    status, reason = got["attn.z . W_O + b_O == attn.out"]
    assert status == FAIL and "layers.0.attn.out" in reason
    assert got["resid_mid, resid_post == sums of their parts"][0] == FAIL
    assert got["no-probe run == transformers"][0] == PASS  # the model itself is untouched
    assert "FAILED" in report.table().splitlines()[-1]


@pytest.mark.parametrize(("name", "rule", "row", "says"), [
    # W_out read transposed: its rows are no longer the neurons
    ("mlp.W_out", WeightRule("mlp.c_proj.weight", "linear_in_out"),
     "neuron ablation == W_out edit", "layers.1.mlp.W_out is (32, 128)"),
    # W_O read from the wrong matrix (the same head layout): zeroing head h's rows there is
    # not zeroing head h
    ("attn.W_O", WeightRule("attn.c_attn.weight", "conv1d_out_heads"),
     "head ablation == W_O edit", "differs at logits"),
])
def test_a_wrong_weight_mapping_fails(monkeypatch, tiny_dir, name, rule, row, says):
    gpt2 = families.adapter_for("gpt2")
    _patched(monkeypatch, "gpt2", block_weights={**gpt2.block_weights, name: rule})
    report = check(tiny_dir("gpt2"))
    status, reason = statuses(report)[row]
    assert status == FAIL and says in reason, report.table()
    assert not report.ok


def test_token_inputs_stay_inside_the_vocabulary_and_positions(tiny_model):
    config = tiny_model("gpt2").config
    ids = token_inputs(config, batch=3, seq=100, seed=4)
    assert ids.shape == (3, config.n_positions)
    special = {config.pad_token_id, config.bos_token_id, config.eos_token_id}
    assert int(ids.min()) >= 0 and int(ids.max()) < config.vocab_size
    assert not (set(ids.unique().tolist()) & special)
    assert torch.equal(ids, token_inputs(config, batch=3, seq=100, seed=4))


def test_text_inputs_need_a_tokenizer(tiny_dir):
    from cloche.errors import UsageError

    with pytest.raises(UsageError, match="no tokenizer"):
        check(tiny_dir("gpt2"), text="hello")


def test_the_shipped_model_checks_on_text():
    report = check(None, text="Once upon a time there was a cat. Once upon a time")
    assert report.ok, report.table()
    assert report.model == "cloche-default" and "the text" in report.details["inputs"]


@pytest.mark.parametrize("family", ["llama", "gemma2", "mixtral"])
def test_bfloat16_checks_with_tolerances_of_its_precision(family, tiny_dir):
    report = check(tiny_dir(family), dtype="bfloat16")
    assert report.ok, report.table()
    assert report.details["dtype"] == "bfloat16"
    assert statuses(report)["gradient probes == autograd"][0] == PASS


def test_tolerances_follow_the_dtype_and_the_magnitude():
    x = torch.tensor([0.5, -2.0])
    assert tolerance(x) == pytest.approx(1e-5 + 2e-5)
    assert tolerance(x.bfloat16()) == pytest.approx(8 * 2**-7 * 2.0)
    row = compare("c", [("a", x, x + 1e-6), ("b", x, x + 1.0)])
    assert row.status == FAIL and row.reason == "differs at b" and row.max_diff == 1.0
    assert compare("c", [("a", x, x)], exact=True).status == PASS
    assert compare("c", [("a", x, x + 1e-6)], exact=True).status == FAIL
    shape = compare("c", [("a", x, x[:1])])
    assert shape.status == FAIL and "shape (2,) vs (1,)" in shape.reason


def test_a_model_saved_without_its_head_checks_its_hidden_states(tmp_path):
    """LlamaModel: no logits and no loss (SKIP, saying why); the stream ends at final_norm."""
    from tests.tiny_models import _configs

    cls, config = _configs()["llama"]
    torch.manual_seed(0)
    cls(config).model.save_pretrained(tmp_path)
    report = check(tmp_path)
    assert report.ok, report.table()
    got = statuses(report)
    assert got["no-probe run == transformers"][0] == SKIP
    assert "without a language-model head" in got["gradient probes == autograd"][1]
    stream = next(r for r in report.rows if r.check == "residual stream == output_hidden_states")
    assert stream.status == PASS and stream.points.endswith("final_norm")
    assert got["neuron ablation == W_out edit"][0] == PASS
