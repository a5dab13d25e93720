"""The SAELens format: both cfg.json layouts, the three architectures, save -> load round trips."""

from __future__ import annotations

import json

import cloche
import pytest
import torch
from cloche.dictionaries import DictionaryConfig, SparseDictionary
from cloche.dictionaries.format import CFG_FILE, WEIGHTS_FILE
from safetensors.torch import save_file

D_IN, D_SAE = 16, 48


def _weights(architecture: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=g),
               "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
               "W_dec": torch.randn(D_SAE, D_IN, generator=g),
               "b_dec": 0.1 * torch.randn(D_IN, generator=g)}
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE, generator=g)
    return weights


def _write(folder, cfg: dict, weights: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CFG_FILE).write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / WEIGHTS_FILE))
    return folder


def _manual(architecture: str, w: dict[str, torch.Tensor], x: torch.Tensor, k: int = 5,
            apply_b_dec: bool = True) -> torch.Tensor:
    """Features as the SAELens papers define them, written out here independently."""
    pre = (x - w["b_dec"] if apply_b_dec else x) @ w["W_enc"] + w["b_enc"]
    if architecture == "standard":
        return pre.clamp(min=0)
    if architecture == "jumprelu":
        return torch.where(pre > w["threshold"], pre, torch.zeros_like(pre)).clamp(min=0)
    values, indices = pre.topk(k, dim=-1)
    out = torch.zeros_like(pre)
    out.scatter_(-1, indices, values.clamp(min=0))
    return out


FLAT = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1,
        "apply_b_dec_to_input": True, "normalize_activations": "none", "prepend_bos": True,
        "context_size": 128, "dtype": "float32", "model_name": "gpt2", "device": "cpu",
        "dataset_path": "some/dataset", "activation_fn_str": "relu"}


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
@pytest.mark.parametrize("layout", ["flat", "metadata"])
def test_hand_written_cfg_loads_and_encodes_as_defined(tmp_path, architecture, layout):
    cfg = {**FLAT, "architecture": architecture}
    if architecture == "topk":
        cfg["k"] = 5
    if layout == "metadata":
        meta = {key: cfg.pop(key) for key in ("hook_name", "hook_layer", "prepend_bos",
                                              "context_size", "model_name", "dataset_path")}
        cfg["metadata"] = meta
    weights = _weights(architecture)
    sae = SparseDictionary.load(_write(tmp_path / "sae", cfg, weights))
    config = sae.config
    assert (config.architecture, config.hook_name, config.hook_layer) == (
        architecture, "blocks.1.hook_resid_post", 1)
    assert (config.prepend_bos, config.context_size, config.model_name) == (True, 128, "gpt2")
    x = torch.randn(3, 7, D_IN, generator=torch.Generator().manual_seed(1))
    features = sae.encode(x)
    torch.testing.assert_close(features, _manual(architecture, weights, x))
    torch.testing.assert_close(sae.decode(features), features @ weights["W_dec"] + weights["b_dec"])
    if architecture == "topk":
        assert int((features > 0).sum(-1).max()) <= 5


def test_older_topk_files_keep_k_in_activation_fn_kwargs(tmp_path):
    cfg = {**FLAT, "architecture": "standard", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 3}}
    sae = SparseDictionary.load(_write(tmp_path / "old", cfg, _weights("standard")))
    assert (sae.config.architecture, sae.config.k) == ("topk", 3)


def test_log_threshold_is_read_as_its_exponential(tmp_path):
    weights = _weights("jumprelu")
    log = {**{k: v for k, v in weights.items() if k != "threshold"},
           "log_threshold": weights["threshold"].log()}
    sae = SparseDictionary.load(_write(tmp_path / "log", {**FLAT, "architecture": "jumprelu"},
                                       log))
    torch.testing.assert_close(sae.threshold.detach(), weights["threshold"])


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "topk"])
def test_save_then_load_gives_identical_features(tmp_path, architecture):
    config = DictionaryConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture,
                              k=4 if architecture == "topk" else None,
                              hook_name="layers.0.resid_post", prepend_bos=False,
                              context_size=64, extra={"dataset_path": "mine"})
    sae = SparseDictionary(config, _weights(architecture, seed=3))
    sae.save(tmp_path / "out")
    again = SparseDictionary.load(tmp_path / "out")
    assert again.config == config
    x = torch.randn(2, 5, D_IN)
    assert torch.equal(sae.encode(x), again.encode(x))
    assert torch.equal(sae(x), again(x))
    written = json.loads((tmp_path / "out" / CFG_FILE).read_text())
    # both layouts: SAELens readers old and new find their fields
    assert written["hook_name"] == written["metadata"]["hook_name"] == "layers.0.resid_post"
    assert written["d_sae"] == D_SAE and written["architecture"] == architecture


@pytest.mark.parametrize("how", ["constant_norm_rescale", "layer_norm"])
def test_input_normalisations_are_undone_on_the_way_out(how):
    config = DictionaryConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations=how,
                              apply_b_dec_to_input=False)
    weights = _weights("standard")
    sae = SparseDictionary(config, weights)
    x = 3.0 * torch.randn(4, D_IN) + 1.0
    if how == "constant_norm_rescale":
        scale = D_IN ** 0.5 / x.norm(dim=-1, keepdim=True)
        want_f = _manual("standard", weights, x * scale, apply_b_dec=False)
        want = (want_f @ weights["W_dec"] + weights["b_dec"]) / scale
    else:
        mean, centred = x.mean(-1, keepdim=True), x - x.mean(-1, keepdim=True)
        std = centred.std(-1, keepdim=True)
        want_f = _manual("standard", weights, centred / (std + 1e-5), apply_b_dec=False)
        want = (want_f @ weights["W_dec"] + weights["b_dec"]) * std + mean
    torch.testing.assert_close(sae.encode(x), want_f)
    torch.testing.assert_close(sae.decode(sae.encode(x), x), want)
    with pytest.raises(cloche.UsageError, match="needs the input"):
        sae.decode(sae.encode(x))


def test_bad_files_and_weights_get_clear_errors(tmp_path):
    with pytest.raises(cloche.UsageError, match="not a SAELens dictionary folder"):
        SparseDictionary.load(tmp_path)
    with pytest.raises(cloche.UsageError, match="k in"):
        DictionaryConfig(d_in=4, d_sae=8, architecture="topk")
    with pytest.raises(cloche.UsageError, match="architecture"):
        DictionaryConfig(d_in=4, d_sae=8, architecture="gated-ish")
    weights = _weights("standard")
    weights["W_dec"] = weights["W_dec"][:, :3]
    with pytest.raises(cloche.UsageError, match="W_dec"):
        SparseDictionary(DictionaryConfig(d_in=D_IN, d_sae=D_SAE), weights)
    with pytest.raises(cloche.UsageError, match="threshold"):
        SparseDictionary(DictionaryConfig(d_in=D_IN, d_sae=D_SAE, architecture="jumprelu"),
                         _weights("standard"))


D_OUT = 24


@pytest.mark.parametrize("architecture", ["transcoder", "skip_transcoder", "jumprelu_transcoder"])
@pytest.mark.parametrize("layout", ["flat", "metadata"])
def test_transcoders_read_one_point_and_write_another(tmp_path, architecture, layout):
    g = torch.Generator().manual_seed(4)
    weights = {"W_enc": torch.randn(D_IN, D_SAE, generator=g),
               "b_enc": 0.1 * torch.randn(D_SAE, generator=g),
               "W_dec": torch.randn(D_SAE, D_OUT, generator=g),
               "b_dec": 0.1 * torch.randn(D_OUT, generator=g)}
    if architecture == "skip_transcoder":
        weights["W_skip"] = torch.randn(D_OUT, D_IN, generator=g)
    if architecture == "jumprelu_transcoder":
        weights["threshold"] = torch.rand(D_SAE, generator=g)
    cfg = {**FLAT, "architecture": architecture, "d_out": D_OUT,
           "hook_name": "blocks.0.ln2.hook_normalized", "hook_name_out": "blocks.0.hook_mlp_out",
           "hook_layer_out": 0, "apply_b_dec_to_input": False}
    if layout == "metadata":
        cfg["metadata"] = {key: cfg.pop(key) for key in ("hook_name", "hook_name_out",
                                                         "hook_layer_out", "hook_layer")}
    sae = SparseDictionary.load(_write(tmp_path / "tc", cfg, weights))
    assert (sae.d_out, sae.hook_name_out) == (D_OUT, "blocks.0.hook_mlp_out")
    x = torch.randn(2, 5, D_IN)
    pre = x @ weights["W_enc"] + weights["b_enc"]  # no b_dec shift: it has d_out values
    want = pre.clamp(min=0)
    if architecture == "jumprelu_transcoder":
        want = torch.where(pre > weights["threshold"], want, torch.zeros_like(want))
    torch.testing.assert_close(sae.encode(x), want)
    out = want @ weights["W_dec"] + weights["b_dec"]
    if architecture == "skip_transcoder":
        out = out + x @ weights["W_skip"].T
    torch.testing.assert_close(sae.decode(sae.encode(x), x), out)
    sae.save(tmp_path / "again")
    again = SparseDictionary.load(tmp_path / "again")
    assert again.config == sae.config
    assert torch.equal(again(x), sae(x))
