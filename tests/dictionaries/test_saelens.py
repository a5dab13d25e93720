"""cloche's SAELens format checked against SAELens itself: a dictionary cloche saves loads in
SAELens (``SAE.load_from_disk``) with the same features and outputs, and what SAELens saves
(``save_model``; a training SAE's ``save_inference_model``) loads in cloche the same way, and
attaches to a model with the features SAELens computes from the same activations.

Skipped, with the reason, where sae_lens is not installed (``pip install --no-deps sae-lens``);
see tests/dictionaries/saelens.py for how it is imported next to TransformerLens 4.
"""

from __future__ import annotations

import json

import cloche
import pytest
import torch
from cloche.dictionaries import DictionaryConfig, SparseDictionary

from tests.dictionaries import saelens
from tests.needs import missing

saes = saelens.saes


@pytest.fixture(autouse=True)
def _need_saelens() -> None:
    """Skip without SAELens (and say why); under CI (``CI=true``), whose test command installs
    it, fail instead, so CI cannot pass without running these checks."""
    if saes is None:
        missing(saelens.REASON or "sae_lens is missing (pip install --no-deps sae-lens)")

D_IN, D_SAE, D_OUT = 16, 48, 12
HOOK = "blocks.1.hook_resid_post"


def _random_weights(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (a threshold in (0, 1)), so features are neither all on nor off."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "threshold":
                p.copy_(0.5 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (0.1 if name.startswith("b") else 1))


def _inputs(d_in: int = D_IN) -> torch.Tensor:
    return torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(9))


def _saelens_output(sae, x: torch.Tensor) -> torch.Tensor:
    """What SAELens gives for the dictionary's output (the transcoders' forward adds W_skip)."""
    if isinstance(sae, saes.Transcoder):
        return sae.forward(x)
    return sae.decode(sae.encode(x))


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    """Bit for bit: cloche computes what SAELens computes, in the same order."""
    assert torch.equal(got, want), (got - want).abs().max()


CLOCHE_CASES = [
    {"architecture": "standard"},
    {"architecture": "standard", "apply_b_dec_to_input": False},
    {"architecture": "jumprelu"},
    {"architecture": "topk", "k": 5},
    {"architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": True},
    {"architecture": "standard", "normalize_activations": "layer_norm"},
    {"architecture": "topk", "k": 5, "normalize_activations": "constant_norm_rescale"},
    {"architecture": "transcoder", "d_out": D_OUT},
    {"architecture": "skip_transcoder", "d_out": D_OUT},
    {"architecture": "jumprelu_transcoder", "d_out": D_OUT},
    {"architecture": "jumprelu_skip_transcoder", "d_out": D_OUT},
]


@pytest.mark.parametrize("case", CLOCHE_CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_what_cloche_saves_loads_in_saelens(tmp_path, case):
    transcoder = "transcoder" in case["architecture"]
    config = DictionaryConfig(d_in=D_IN, d_sae=D_SAE, hook_name=HOOK, model_name="tiny",
                              prepend_bos=True, context_size=64,
                              apply_b_dec_to_input=not transcoder and case.pop(
                                  "apply_b_dec_to_input", True),
                              hook_name_out="blocks.1.hook_mlp_out" if transcoder else None,
                              **case)
    ours = SparseDictionary(config)
    _random_weights(ours, seed=1)
    ours.save(tmp_path / "sae")
    theirs = saes.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == config.architecture
    assert theirs.cfg.metadata.hook_name == HOOK
    assert theirs.cfg.metadata.prepend_bos is True and theirs.cfg.metadata.context_size == 64
    if transcoder:
        assert theirs.cfg.d_out == D_OUT
        assert theirs.cfg.metadata.hook_name_out == "blocks.1.hook_mlp_out"
    x = _inputs()
    with torch.no_grad():
        features = ours.encode(x)
        assert 0 < int((features > 0).sum()) < features.numel()
        _same(features, theirs.encode(x))
        _same(ours(x), _saelens_output(theirs, x))


def _metadata(**more):
    from sae_lens.saes.sae import SAEMetadata

    return SAEMetadata(**{"hook_name": HOOK, "model_name": "tiny", "prepend_bos": False,
                          "context_size": 32, **more})


SAELENS_CASES = {
    "standard": lambda: saes.StandardSAE(saes.StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, metadata=_metadata())),
    "standard-layer_norm": lambda: saes.StandardSAE(saes.StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, normalize_activations="layer_norm", metadata=_metadata())),
    "jumprelu": lambda: saes.JumpReLUSAE(saes.JumpReLUSAEConfig(
        d_in=D_IN, d_sae=D_SAE, metadata=_metadata())),
    "topk": lambda: saes.TopKSAE(saes.TopKSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=5, metadata=_metadata())),
    "topk-rescaled": lambda: saes.TopKSAE(saes.TopKSAEConfig(
        d_in=D_IN, d_sae=D_SAE, k=5, rescale_acts_by_decoder_norm=True, metadata=_metadata())),
    "transcoder": lambda: saes.Transcoder(saes.TranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
        metadata=_metadata(hook_name_out="blocks.1.hook_mlp_out"))),
    "skip_transcoder": lambda: saes.SkipTranscoder(saes.SkipTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
        metadata=_metadata(hook_name_out="blocks.1.hook_mlp_out"))),
    "jumprelu_transcoder": lambda: saes.JumpReLUTranscoder(saes.JumpReLUTranscoderConfig(
        d_in=D_IN, d_sae=D_SAE, d_out=D_OUT, apply_b_dec_to_input=False,
        metadata=_metadata(hook_name_out="blocks.1.hook_mlp_out"))),
}


@pytest.mark.parametrize("name", sorted(SAELENS_CASES))
def test_what_saelens_saves_loads_in_cloche(tmp_path, name):
    theirs = SAELENS_CASES[name]()
    _random_weights(theirs, seed=2)
    theirs.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert "hook_name" not in cfg and cfg["metadata"]["hook_name"] == HOOK  # SAELens 6 layout
    ours = SparseDictionary.load(tmp_path / "sae")
    assert ours.config.architecture == theirs.cfg.architecture()
    assert ours.hook_name == HOOK and ours.config.prepend_bos is False
    assert ours.config.context_size == 32
    if "transcoder" in name:
        assert ours.hook_name_out == "blocks.1.hook_mlp_out" and ours.d_out == D_OUT
    x = _inputs()
    with torch.no_grad():
        features = theirs.encode(x)
        assert 0 < int((features > 0).sum()) < features.numel()
        _same(ours.encode(x), features)
        _same(ours(x), _saelens_output(theirs, x))
    # and a save by cloche of what it loaded loads in SAELens again, metadata included
    ours.save(tmp_path / "again")
    again = saes.SAE.load_from_disk(tmp_path / "again")
    assert again.cfg.metadata.sae_lens_version == theirs.cfg.metadata.sae_lens_version
    with torch.no_grad():
        _same(again.encode(x), features)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu", "standard"])
def test_a_saelens_training_sae_saved_for_inference_loads_in_cloche(tmp_path, architecture):
    """``save_inference_model`` folds a TopK's decoder norms and records the training details
    in ``metadata``; cloche reads what it wrote with the trained SAE's features."""
    configs = {"topk": lambda: saes.TopKTrainingSAE(saes.TopKTrainingSAEConfig(
                   d_in=D_IN, d_sae=D_SAE, k=5, metadata=_metadata())),
               "jumprelu": lambda: saes.JumpReLUTrainingSAE(saes.JumpReLUTrainingSAEConfig(
                   d_in=D_IN, d_sae=D_SAE, metadata=_metadata())),
               "standard": lambda: saes.StandardTrainingSAE(saes.StandardTrainingSAEConfig(
                   d_in=D_IN, d_sae=D_SAE, metadata=_metadata()))}
    trained = configs[architecture]()
    _random_weights(trained, seed=3)
    trained.eval()
    trained.save_inference_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["training_architecture"] == architecture
    ours = SparseDictionary.load(tmp_path / "sae")
    reference = saes.SAE.load_from_disk(tmp_path / "sae")
    x = _inputs()
    with torch.no_grad():
        _same(ours.encode(x), reference.encode(x))
        _same(ours(x), reference.decode(reference.encode(x)))
        if architecture == "topk":  # the fold kept the features the training SAE had
            torch.testing.assert_close(ours.encode(x), trained.encode(x), rtol=1e-5, atol=1e-5)


def test_a_saelens_dictionary_attached_to_a_model_gives_saelens_features(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    theirs = saes.TopKSAE(saes.TopKSAEConfig(d_in=model.d_model, d_sae=4 * model.d_model, k=6,
                                             rescale_acts_by_decoder_norm=True,
                                             metadata=_metadata(context_size=None,
                                                                prepend_bos=None)))
    _random_weights(theirs, seed=4)
    theirs.save_model(tmp_path / "sae")
    model.attach_dictionary("lens", tmp_path / "sae")
    try:
        assert model.dictionaries()["lens"]["point"] == "layers.1.resid_post"
        inputs = torch.arange(3, 27).reshape(2, 12)
        model.run(inputs, probes={"layers.1.resid_post": _keep, "dict:lens:features": _keep},
                  save="lens")
        saved = model.save_context("lens")
        x, features = saved.fetch("layers.1.resid_post"), saved.fetch("dict:lens:features")
        saved.clear()
    finally:
        model.detach_dictionary("lens")
    with torch.no_grad():
        _same(features, theirs.encode(x))


def _keep(ctx, x):
    ctx.save(ctx.point, x)


def test_the_saelens_that_was_checked():
    """Say which SAELens the checks ran against (it shows in ``pytest -rA``)."""
    import sae_lens

    assert sae_lens.__version__.split(".")[0] == "6", sae_lens.__version__


def test_a_hook_z_dictionary_is_refused_with_a_reason(tmp_path):
    theirs = saes.StandardSAE(saes.StandardSAEConfig(
        d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z",
        metadata=_metadata(hook_name="blocks.1.attn.hook_z")))
    theirs.save_model(tmp_path / "sae")
    with pytest.raises(cloche.UsageError, match="reshape_activations='hook_z'"):
        SparseDictionary.load(tmp_path / "sae")
