"""Hub names through the Hugging Face cache (offline), the class a checkpoint was saved as, dtypes.

Every test lays out its own cache (``tests/model/hf_cache.py``) and runs with
``HF_HUB_OFFLINE=1``: nothing here touches the network. A model loaded by name must give
exactly what the same files give when loaded from their directory.
"""

from __future__ import annotations

import json
import pathlib

import cloche
import pytest
import torch
import transformers
from cloche.errors import UnknownProbePoint, UsageError
from cloche.model.hub import display_name, resolve_model
from tests.conftest_server import ServerProcess
from tests.model.hf_cache import add_snapshot, repo_folder, use_cache
from tests.threads import TORCH_THREADS
from tests.tiny_models import VOCAB, save_tiny

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
TOKEN = "hub-test-token-0123456789"
_SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64, "vocab_size": VOCAB,
          "pad_token_id": 2}


@pytest.fixture
def cache(monkeypatch, tmp_path) -> pathlib.Path:
    return use_cache(monkeypatch, tmp_path / "hf-home")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> pathlib.Path:
    return save_tiny("llama", tmp_path_factory.mktemp("llama"))


def save_base(cls, config, directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A base model (no head) saved as itself: config.architectures names it."""
    torch.manual_seed(seed)
    cls(config).save_pretrained(directory)
    return directory


def test_the_fixture_really_points_huggingface_hub_at_the_cache(cache):
    import huggingface_hub.constants as constants
    from huggingface_hub import snapshot_download

    assert str(cache) == constants.HF_HUB_CACHE and constants.is_offline_mode()
    with pytest.raises(FileNotFoundError):  # LocalEntryNotFoundError: offline, not cached
        snapshot_download("org/absent")


def test_a_hub_name_loads_from_the_cache_as_from_its_directory(cache, llama_dir):
    snapshot = add_snapshot(cache, "org/tiny-llama", llama_dir)
    by_name = cloche.load("org/tiny-llama")
    by_dir = cloche.load(llama_dir)
    assert by_name.name == "org/tiny-llama" and by_name.info()["name"] == "org/tiny-llama"
    assert pathlib.Path(by_name.executor.path) == snapshot
    assert torch.equal(by_name.run(IDS).logits, by_dir.run(IDS).logits)
    assert by_name.info()["lm_head"] is True and by_name.info()["lacks"] == []
    assert display_name(snapshot) == "org/tiny-llama"


def test_revision_picks_the_commit_a_tag_or_hash_names(cache, llama_dir, tmp_path):
    other = save_tiny("llama", tmp_path / "v2", seed=7)
    add_snapshot(cache, "org/tiny-llama", llama_dir, refs=("main",))
    tagged = add_snapshot(cache, "org/tiny-llama", other, refs=("v2",))
    main = cloche.load("org/tiny-llama").run(IDS).logits
    by_tag = cloche.load("org/tiny-llama", revision="v2").run(IDS).logits
    by_hash = cloche.load("org/tiny-llama", revision=tagged.name).run(IDS).logits
    assert torch.equal(by_tag, by_hash) and torch.equal(by_tag, cloche.load(other).run(IDS).logits)
    assert not torch.equal(main, by_tag)
    with pytest.raises(UsageError, match=r"no snapshot of it at revision 'v3'"):
        cloche.load("org/tiny-llama", revision="v3")


def test_an_unknown_name_offline_says_what_was_tried_and_how_to_fix_it(cache):
    with pytest.raises(UsageError) as info:
        cloche.load("org/not-cached")
    message = str(info.value)
    for part in ("'org/not-cached'", str(cache), "HF_HUB_OFFLINE=1", "hf download org/not-cached",
                 "save_pretrained"):
        assert part in message, message


def test_paths_and_bad_names_are_refused_clearly(cache, llama_dir, tmp_path):
    with pytest.raises(UsageError, match="not a model directory"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(UsageError, match="not a model directory"):
        resolve_model("./no-such-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match=r"no config\.json"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(UsageError, match="neither a local model directory nor a hub name"):
        resolve_model("bad--name")
    with pytest.raises(UsageError, match="applies to hub names"):
        cloche.load(llama_dir, revision="main")


def test_a_cached_repo_without_config_is_not_a_model(cache, tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "README.md").write_text("not a model")
    add_snapshot(cache, "org/readme-only", files)
    with pytest.raises(UsageError, match=r"no config\.json"):
        cloche.load("org/readme-only")


def test_a_snapshot_without_its_weights_says_it_is_incomplete(cache, llama_dir, tmp_path):
    files = tmp_path / "config-only"
    files.mkdir()
    (files / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
    add_snapshot(cache, "org/half-downloaded", files)
    with pytest.raises(UsageError, match=r"has no complete weights \(model\.safetensors"):
        cloche.load("org/half-downloaded")


# ------------------------------------------------------------------ the class it was saved as


def test_a_bert_model_saved_without_head_loads_as_bert_model(cache, tmp_path):
    config = transformers.BertConfig(**_SIZES)
    directory = save_base(transformers.BertModel, config, tmp_path / "bert-base")
    assert json.loads((directory / "config.json").read_text())["architectures"] == ["BertModel"]
    add_snapshot(cache, "org/tiny-bert", directory)
    model = cloche.load("org/tiny-bert")
    assert type(model.hf_model).__name__ == "BertModel"
    info = model.info()
    assert info["lm_head"] is False and info["family"] == "bert"
    assert set(info["lacks"]) >= {"logits", "unembed.W_U"}
    names = {p.name for p in model.probe_points()}
    assert {"embed", "layers.0.attn.pattern", "layers.1.mlp.post", "layers.1.resid_post"} <= names
    assert "logits" not in names
    reference = transformers.BertModel.from_pretrained(directory).eval()
    with torch.no_grad():
        expected = reference(IDS, attention_mask=torch.ones_like(IDS)).last_hidden_state
    result = model.run(IDS, probes={"layers.1.resid_post": lambda c, x: c.save("h", x)},
                       save="hub-bert")
    assert result.logits is None and result.loss is None
    assert torch.equal(model.save_context("hub-bert").fetch("h")[0], expected)
    w_q = model.param("layers.0.attn.W_Q")
    raw = reference.encoder.layer[0].attention.self.query.weight
    assert torch.equal(w_q, raw.T.reshape(32, 4, 8).permute(1, 0, 2))
    with pytest.raises(UnknownProbePoint, match=r"unembed\.W_U"):
        model.param("unembed.W_U")
    with pytest.raises(UsageError, match="without a language-model head"):
        model.run(IDS, backward=lambda out: out.logits.sum())


def test_a_llama_model_without_head_cannot_generate_and_says_why(cache, tmp_path):
    config = transformers.LlamaConfig(num_key_value_heads=2, **_SIZES)
    directory = save_base(transformers.LlamaModel, config, tmp_path / "llama-base")
    add_snapshot(cache, "org/llama-base", directory)
    model = cloche.load("org/llama-base")
    assert type(model.hf_model).__name__ == "LlamaModel"
    assert model.info()["lm_head"] is False and "layers.1.attn.q" in {
        p.name for p in model.probe_points()}
    assert model.run(IDS).logits is None
    with pytest.raises(UsageError, match="generate needs one"):
        model.generate(IDS[:1], max_new_tokens=2)
    with pytest.raises(UsageError, match="backward needs one"):
        model.run(IDS, backward=True)


def test_missing_weights_fail_instead_of_being_randomly_initialised(tmp_path):
    config = transformers.BertConfig(**_SIZES)
    directory = save_base(transformers.BertModel, config, tmp_path / "mislabelled")
    saved = json.loads((directory / "config.json").read_text())
    saved["architectures"] = ["BertForMaskedLM"]  # claims a head the weights lack
    (directory / "config.json").write_text(json.dumps(saved))
    with pytest.raises(UsageError, match=r"BertForMaskedLM lacks \d+ weight.*cls\.predictions"):
        cloche.load(directory)


# ------------------------------------------------------------------ dtypes


def test_bf16_and_auto_by_name_match_the_directory(cache, llama_dir, tmp_path):
    add_snapshot(cache, "org/tiny-llama", llama_dir)
    by_name = cloche.load("org/tiny-llama", dtype="bfloat16")
    by_dir = cloche.load(llama_dir, dtype=torch.bfloat16)
    assert by_name.param("layers.0.attn.W_Q").dtype == torch.bfloat16
    logits = by_name.run(IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, by_dir.run(IDS).logits)
    # a checkpoint saved in bf16 loads in bf16 with dtype="auto", in float32 by default
    half = transformers.LlamaForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    half.save_pretrained(tmp_path / "bf16")
    add_snapshot(cache, "org/tiny-llama-bf16", tmp_path / "bf16")
    auto = cloche.load("org/tiny-llama-bf16", dtype="auto")
    assert auto.param("embed.W_E").dtype == torch.bfloat16
    assert cloche.load("org/tiny-llama-bf16").param("embed.W_E").dtype == torch.float32
    assert torch.equal(auto.run(IDS).logits, logits)


def test_fp16_and_an_explicit_device_by_name(cache, llama_dir):
    add_snapshot(cache, "org/tiny-llama", llama_dir)
    by_name = cloche.load("org/tiny-llama", dtype="float16", device="cpu")
    by_dir = cloche.load(llama_dir, dtype="float16", device=torch.device("cpu"))
    assert by_name.device == torch.device("cpu") and by_name.info()["device"] == "cpu"
    logits = by_name.run(IDS).logits
    assert logits.dtype == torch.float16 and torch.equal(logits, by_dir.run(IDS).logits)


def test_a_torchrun_rank_resolves_a_hub_name_itself(cache, llama_dir):
    from cloche.sharding.worker import model_directory

    snapshot = add_snapshot(cache, "org/tiny-llama", llama_dir, refs=("main", "v1"))
    assert model_directory("org/tiny-llama") == str(snapshot)
    assert model_directory("org/tiny-llama", "v1") == str(snapshot)
    assert model_directory(str(llama_dir)) == str(llama_dir)


# ------------------------------------------------------------------ serve and sharded launch


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_cloche_serve_loads_a_hub_name_offline(cache, llama_dir, tmp_path, world_size):
    other = save_tiny("llama", tmp_path / "v2", seed=7)
    add_snapshot(cache, "org/tiny-llama", llama_dir)
    add_snapshot(cache, "org/tiny-llama", other, refs=("v2",))
    expected = cloche.load(other, dtype="bfloat16").run(IDS).logits
    server = ServerProcess("org/tiny-llama", TOKEN, "--revision", "v2", "--dtype", "bfloat16",
                           "--device", "cpu", "--world-size", str(world_size),
                           log_path=tmp_path / "serve.log")
    try:
        with cloche.connect(server.address, token=TOKEN) as model:
            assert model.name == "org/tiny-llama"
            logits = model.run(IDS).logits
            assert logits.dtype == torch.bfloat16 and torch.equal(logits, expected)
    finally:
        server.stop()


@pytest.mark.slow
def test_cloche_serve_refuses_an_unknown_name_clearly(cache, tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(RuntimeError, match="exited with 2"):
        ServerProcess("org/not-cached", TOKEN, log_path=log)
    text = log.read_text()
    assert "cloche: error: 'org/not-cached' is not a local model directory" in text, text
    assert "hf download org/not-cached" in text


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_sharded_launch_resolves_once_and_matches_the_directory(cache, llama_dir, dtype):
    from cloche.sharding.launch import start_local

    snapshot = add_snapshot(cache, "org/tiny-llama", llama_dir)
    expected = cloche.load(llama_dir, dtype=dtype).run(IDS).logits
    model = start_local("org/tiny-llama", 2, dtype=dtype, timeout_s=30.0,
                        threads=TORCH_THREADS)
    try:
        worker = model.executor.group.processes[1]
        assert str(snapshot) in worker.args  # the rank got the snapshot path, not the name
        assert model.name == "org/tiny-llama"
        logits = model.run(IDS).logits
        assert logits.dtype == expected.dtype and torch.equal(logits, expected)
    finally:
        model.close()


@pytest.mark.slow
def test_a_sharded_bert_model_without_head_matches_the_local_one(cache, tmp_path):
    from cloche.sharding.launch import start_local

    config = transformers.BertConfig(**_SIZES)
    directory = save_base(transformers.BertModel, config, tmp_path / "bert-base")
    add_snapshot(cache, "org/tiny-bert", directory)
    local = cloche.load("org/tiny-bert")
    probes = {"layers.1.resid_post": lambda c, x: c.save("h", x)}
    local.run(IDS, probes=probes, save="hub-bert")
    model = start_local("org/tiny-bert", 2, timeout_s=30.0, threads=TORCH_THREADS)
    try:
        assert model.info()["lm_head"] is False
        result = model.run(IDS, probes=probes, save="hub-bert")
        assert result.logits is None
        assert torch.equal(model.save_context("hub-bert").fetch("h")[0],
                           local.save_context("hub-bert").fetch("h")[0])
    finally:
        model.close()


def test_repo_folder_layout_matches_huggingface_hub(cache):
    from huggingface_hub.file_download import repo_folder_name

    assert repo_folder(cache, "org/x").name == repo_folder_name(repo_id="org/x", repo_type="model")
