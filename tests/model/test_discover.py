"""Families deliberately left without an adapter: cloche discovers their structure, gives every
point it can prove (checked here against plain transformers, as for adapter families), and says
loudly what it lacks and why."""

from __future__ import annotations

import warnings

import cloche
import pytest
import torch
import transformers as t
from tests.tiny_models import _COMMON, VOCAB

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))

# none of these has an adapter: CodeGen runs attention and MLP in parallel, Helium is a
# sequential Llama-like decoder with a gated MLP, Persimmon sequential with a plain MLP
UNKNOWN = {
    "codegen": (t.CodeGenForCausalLM, t.CodeGenConfig(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, **_COMMON)),
    "helium": (t.HeliumForCausalLM, t.HeliumConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_COMMON)),
    "persimmon": (t.PersimmonForCausalLM, t.PersimmonConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, **_COMMON)),
}
PARALLEL = {"codegen": True, "helium": False, "persimmon": False}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    made = {}

    def make(family):
        if family not in made:
            cls, config = UNKNOWN[family]
            torch.manual_seed(0)
            model = cls(config)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name or "ln_" in name:
                        p.add_(0.1 * torch.randn_like(p))
            made[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(made[family])
        return made[family]

    return make


def load(directory):
    with pytest.warns(UserWarning, match="no cloche adapter; cloche discovered its structure"):
        return cloche.load(directory)


def capture(model, names):
    model.save_context("d").clear()
    model.run(IDS, probes={n: (lambda c, x: c.save(c.point, x)) for n in names}, save="d")
    handle = model.save_context("d")
    values = {n: handle.fetch(n)[0] for n in names}
    handle.clear()
    return values


@pytest.mark.parametrize("family", UNKNOWN)
def test_discovered_points_match_plain_transformers(family, saved):
    assert cloche.model.adapter_for(family) is None
    model = load(saved(family))
    assert model.executor.adapter.discovered
    info = model.info()
    assert info["parallel"] is PARALLEL[family]
    names = [p.name for p in model.probe_points() if not p.name.startswith("module:")]
    expected = {"embed", "final_norm", "logits", "resid_pre", "ln1", "attn.q", "attn.k", "attn.v",
                "attn.pattern", "attn.z", "attn.out", "mlp.post", "mlp.out", "resid_post"}
    if not PARALLEL[family]:
        expected |= {"resid_mid", "ln2"}
    short = {n.split(".", 2)[2] if n.startswith("layers.") else n for n in names}
    assert expected <= short, expected - short
    got = capture(model, names)
    cls = UNKNOWN[family][0]
    plain = cls.from_pretrained(saved(family)).eval()
    eager = cls.from_pretrained(saved(family), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = plain(IDS, output_hidden_states=True)
        att = eager(IDS, output_attentions=True)
    n = model.n_layers
    for i in range(n):
        torch.testing.assert_close(got[f"layers.{i}.resid_pre"], ref.hidden_states[i],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(got[f"layers.{i}.attn.pattern"], att.attentions[i],
                                   atol=1e-5, rtol=0)
        total = got[f"layers.{i}.resid_pre"] + got[f"layers.{i}.attn.out"]
        if not PARALLEL[family]:
            torch.testing.assert_close(got[f"layers.{i}.resid_mid"], total, atol=1e-5, rtol=0)
        torch.testing.assert_close(got[f"layers.{i}.resid_post"],
                                   total + got[f"layers.{i}.mlp.out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["final_norm"], ref.hidden_states[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["logits"], ref.logits, atol=1e-5, rtol=0)
    assert torch.equal(model.run(IDS).logits, ref.logits)  # no probe: the plain model


@pytest.mark.parametrize("family", UNKNOWN)
def test_zeroing_a_discovered_neuron_equals_zeroing_its_weights(family, saved):
    model = load(saved(family))
    site = model.executor.adapter.block_sites["mlp.post"]
    j = 4

    def zero(ctx, x):
        x = x.clone()
        x[..., j] = 0
        return x

    ablated = model.run(IDS, probes={"layers.1.mlp.post": zero}).logits
    edited = load(saved(family))
    raw = f"{edited.executor.adapter.layers}.1.{site.module}.weight"
    with torch.no_grad():
        edited.param(raw)[:, j] = 0
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)


def test_what_is_missing_is_said_at_load_in_info_and_in_errors(saved):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = cloche.load(saved("codegen"))
    (warning,) = [w for w in caught if "cloche" in str(w.message)]
    assert "resid_mid (attention and MLP run in parallel" in str(warning.message)
    missing = model.info()["missing"]
    assert any(line.startswith("layers.*.resid_mid: attention and MLP run in parallel")
               for line in missing)
    with pytest.raises(cloche.UnknownProbePoint, match="run in parallel"):
        model.run(IDS, probes={"layers.0.resid_mid": lambda c, x: None})
    helium = load(saved("helium"))
    with pytest.raises(cloche.UnknownProbePoint, match="gated or otherwise unproven"):
        helium.resolve("blocks.0.mlp.hook_pre")


@pytest.mark.parametrize("family", UNKNOWN)
def test_discovery_in_bfloat16_finds_what_it_finds_in_float32(family, saved):
    """Sums taken in another order round differently in half precision: the checks allow for
    it without letting resid_pre pass for resid_pre + attn.out."""
    full = load(saved(family)).executor.adapter
    with pytest.warns(UserWarning, match="no cloche adapter; cloche discovered its structure"):
        half = cloche.load(saved(family), dtype="bfloat16").executor.adapter
    assert half.block_sites == full.block_sites
    assert (half.parallel, half.attention, half.final_norm) == (full.parallel, full.attention,
                                                                full.final_norm)
