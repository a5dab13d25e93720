"""Training a dictionary where its point lives: the loss falls, checkpoints resume, a cancel
keeps what was trained; evaluation reports the issue's figures. Local, remote and sharded."""

from __future__ import annotations

import threading

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.dictionaries import SparseDictionary
from cloche.dictionaries.training import evaluate_dictionary, train_dictionary
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S
from tests.threads import TORCH_THREADS

TEXTS = [f"the {w} sat on the {v} and then the {w} ran to the {v}"
         for w in ("cat", "dog", "bird", "fox", "cow") for v in ("mat", "hat", "tree", "road")]
SMALL = {"buffer_tokens": 128, "step_tokens": 32, "reuse": 3, "lr": 3e-3}


def _falls(history: list[dict[str, float]]) -> bool:
    first = sum(h["mse"] for h in history[:3]) / 3
    last = sum(h["mse"] for h in history[-3:]) / 3
    return last < 0.8 * first


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir)


def test_loss_falls_and_the_result_is_a_saelens_dictionary(local_model, tmp_path):
    result = train_dictionary(local_model, "blocks.1.hook_resid_pre", TEXTS, kind="topk",
                              d_dict=64, k=4, epochs=2, batch_size=4, progress=False,
                              save_to=tmp_path / "sae", heldout=TEXTS[:6], **SMALL)
    assert result.steps == len(result.history) > 6
    assert _falls(result.history)
    loaded = SparseDictionary.load(tmp_path / "sae")
    assert loaded.config.hook_name == "layers.1.resid_pre" and loaded.config.k == 4
    x = torch.randn(5, local_model.d_model)
    assert torch.equal(loaded.encode(x), result.dictionary.encode(x))
    metrics = result.metrics
    assert metrics is not None
    assert metrics["l0"] <= 4 and 0 <= metrics["dead_fraction"] <= 1
    assert metrics["ce_zero_ablation"] > metrics["ce_clean"]
    assert metrics["fve"] > 0
    assert local_model.dictionaries() == {}  # evaluation attached and detached its own


def test_evaluation_matches_the_definitions(local_model):
    """FVE and the spliced loss, computed again by hand from captured activations."""
    torch.manual_seed(0)
    from tests.dictionaries.checks import make_dictionary

    sae = make_dictionary(local_model.d_model, architecture="standard").requires_grad_(False)
    texts = TEXTS[:4]
    metrics = evaluate_dictionary(local_model, sae, texts, point="layers.1.resid_pre",
                                  batch_size=4, progress=False)
    captured = {}

    def grab(ctx, x):
        captured["x"] = x.clone()

    out = local_model.run(texts, probes={"layers.1.resid_pre": grab})
    x = captured["x"][out.attention_mask.bool()]
    error = x - sae.decode(sae.encode(x))
    fve = 1 - error.pow(2).sum(-1).mean() / (x - x.mean(0)).pow(2).sum(-1).mean()
    assert metrics["fve"] == pytest.approx(float(fve), abs=1e-4)
    spliced = local_model.run(texts, probes={
        "layers.1.resid_pre": lambda c, x: sae.decode(sae.encode(x)).to(x.dtype)})
    assert metrics["ce_spliced"] == pytest.approx(spliced.loss, abs=1e-4)


def test_a_checkpoint_resumes_and_a_cancel_keeps_what_was_trained(local_model, tmp_path):
    folder = str(tmp_path / "ckpt")
    first = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, d_dict=64, k=4,
                             limit=8, batch_size=4, checkpoint=folder, progress=False, **SMALL)
    assert (tmp_path / "ckpt" / "trainer.pt").is_file()
    assert SparseDictionary.load(tmp_path / "ckpt" / "dictionary").d_dict == 64
    cancel = threading.Event()

    def stop_after_first_batch(event):
        if event.get("type") == "progress" and event.get("done", 0) >= 12:
            cancel.set()

    with pytest.raises(cloche.Cancelled):
        train_dictionary(local_model, "layers.1.resid_pre", TEXTS, d_dict=64, k=4, limit=20,
                         batch_size=4, checkpoint=folder, progress=stop_after_first_batch,
                         cancel=cancel, **SMALL)
    resumed = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, d_dict=64, k=4,
                               limit=20, batch_size=4, checkpoint=folder, progress=False,
                               **SMALL)
    assert resumed.steps > first.steps
    assert resumed.history[:first.steps] == first.history  # it went on from the checkpoint
    again = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, d_dict=64, k=4,
                             limit=20, batch_size=4, checkpoint=folder, progress=False, **SMALL)
    assert again.steps == resumed.steps  # nothing left to train on


def test_training_on_a_server(served):
    with cloche.connect(served.address, token=served.token) as model:
        result = train_dictionary(model, "layers.1.resid_pre", TEXTS, d_dict=64, k=4, epochs=2,
                                  batch_size=4, progress=False, **SMALL)
        assert _falls(result.history)
        summary = model.attach_dictionary("trained", result.dictionary)
        try:
            assert summary["point"] == "layers.1.resid_pre"
        finally:
            model.detach_dictionary("trained")


@pytest.mark.slow
def test_training_on_the_rank_of_the_point(tiny4_dir):
    directory = tiny4_dir("gpt2")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        assert model.owner_of("layers.3.resid_pre") == 1
        examples = [torch.randint(3, 90, (12,), generator=torch.Generator().manual_seed(i))
                    for i in range(24)]
        data = Dataset(examples, name="ids", seq_len=12, pad_id=2)
        result = train_dictionary(model, "layers.3.resid_pre", data, d_dict=64, k=4, epochs=2,
                                  batch_size=4, progress=False, **SMALL)
        assert _falls(result.history)
        # the trainer lived on rank 1 and was let go there
        from cloche.learned import live

        assert model.call(lambda m: live.running(), rank="all") == {0: [], 1: []}
        # a JumpReLU transcoder of the rank-1 MLP trains there as it does in one process
        kwargs = {"kind": "jumprelu", "target": "layers.3.mlp.out", "d_dict": 32,
                  "batch_size": 4, "progress": False, **SMALL}
        sharded = train_dictionary(model, "layers.3.ln2", data, **kwargs)
        local = train_dictionary(cloche.load(directory), "layers.3.ln2", data, **kwargs)
        assert sharded.steps == local.steps and _falls(sharded.history)
        for name, weight in local.dictionary.weights().items():
            torch.testing.assert_close(sharded.dictionary.weights()[name], weight, atol=1e-4,
                                       rtol=1e-3)
        assert model.call(lambda m: live.running(), rank="all") == {0: [], 1: []}
    finally:
        model.close()


def test_a_jumprelu_dictionary_learns_its_thresholds(local_model, tmp_path):
    result = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, kind="jumprelu",
                              d_dict=64, epochs=2, batch_size=4, l0_coefficient=3e-3,
                              progress=False, save_to=tmp_path / "jr", heldout=TEXTS[:6],
                              **SMALL)
    assert _falls(result.history)
    loaded = SparseDictionary.load(tmp_path / "jr")
    assert loaded.config.architecture == "jumprelu"
    threshold = loaded.threshold.detach()
    assert bool((threshold >= 0).all()) and threshold.max() > threshold.min()  # they moved
    metrics = result.metrics
    assert metrics is not None and metrics["fve"] > 0 and metrics["l0"] < 64
    # the weights read raw activations: the features the evaluation saw are the loaded ones'
    x = torch.randn(5, local_model.d_model)
    assert torch.equal(loaded.encode(x), result.dictionary.encode(x))


def test_the_l0_penalty_buys_sparsity(local_model):
    def l0(coefficient: float) -> float:
        result = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, kind="jumprelu",
                                  d_dict=64, batch_size=4, l0_coefficient=coefficient,
                                  progress=False, heldout=TEXTS[:6], **SMALL)
        assert result.metrics is not None
        return result.metrics["l0"]

    assert l0(0.05) < l0(0.0)


def test_the_pre_activation_loss_revives_dead_latents(local_model):
    """Thresholds started far above the activations leave nearly every latent dead; the
    pre-activation loss on dead latents pulls their pre-activations up until they fire."""
    def trained(coefficient: float) -> dict[str, float]:
        result = train_dictionary(local_model, "layers.1.resid_pre", TEXTS, kind="jumprelu",
                                  d_dict=64, batch_size=4, l0_coefficient=0.0,
                                  init_threshold=3.0, pre_act_coefficient=coefficient,
                                  dead_after_tokens=1, progress=False, heldout=TEXTS[:6],
                                  **SMALL)
        assert result.metrics is not None
        return result.metrics

    without, with_loss = trained(0.0), trained(1.0)
    assert without["dead_fraction"] > 0.5  # measured 0.86
    assert with_loss["dead_fraction"] < without["dead_fraction"] / 2  # measured 0.0
    assert with_loss["l0"] > without["l0"]


@pytest.mark.parametrize(("kind", "skip"), [("standard", False), ("jumprelu", True)])
def test_a_transcoder_learns_to_write_its_target(local_model, tmp_path, kind, skip):
    result = train_dictionary(local_model, "layers.1.ln2", TEXTS, kind=kind,
                              target="layers.1.mlp.out", skip=skip, d_dict=64, epochs=2,
                              batch_size=4, progress=False, save_to=tmp_path / "tc",
                              heldout=TEXTS[:6], **SMALL)
    assert _falls(result.history)
    loaded = SparseDictionary.load(tmp_path / "tc")
    assert loaded.config.architecture == ("jumprelu_skip_transcoder" if skip else "transcoder")
    assert loaded.hook_name == "layers.1.ln2" and loaded.hook_name_out == "layers.1.mlp.out"
    if skip:
        assert loaded.W_skip.abs().sum() > 0  # the skip connection trained too
    metrics = result.metrics
    assert metrics is not None and metrics["fve"] > 0.2
    # this untrained model hardly needs its MLP (zeroing it costs little), so the splice is
    # checked against the clean loss rather than as a share of that small gap
    assert metrics["ce_spliced"] == pytest.approx(metrics["ce_clean"], abs=0.05)
    # it attaches where it was trained, from its file
    summary = local_model.attach_dictionary("tc", tmp_path / "tc")
    try:
        assert (summary["point"], summary["out_point"]) == ("layers.1.ln2", "layers.1.mlp.out")
    finally:
        local_model.detach_dictionary("tc")


def test_bad_training_requests_are_refused(local_model):
    with pytest.raises(cloche.UsageError, match="no TopK transcoder"):
        train_dictionary(local_model, "layers.1.ln2", TEXTS, target="layers.1.mlp.out",
                         d_dict=8, k=2, progress=False)
    with pytest.raises(cloche.UsageError, match="skip=True is for transcoders"):
        train_dictionary(local_model, "layers.1.ln2", TEXTS, kind="standard", skip=True,
                         d_dict=8, progress=False)
    with pytest.raises(cloche.UsageError, match="kinds"):
        train_dictionary(local_model, "layers.1.ln2", TEXTS, kind="gated", d_dict=8,
                         progress=False)
    with pytest.raises(cloche.UsageError, match="bandwidth"):
        train_dictionary(local_model, "layers.1.ln2", TEXTS, kind="jumprelu", bandwidth=0,
                         d_dict=8, progress=False)


def test_a_transcoder_resumes_from_its_checkpoint_in_raw_units(local_model, tmp_path):
    """The scales a JumpReLU transcoder trains in are checkpointed: a resumed run goes on
    from the same state, and the checkpoint's SAELens copy reads raw activations."""
    folder = str(tmp_path / "ckpt")
    kwargs = {"kind": "jumprelu", "target": "layers.1.mlp.out", "d_dict": 32, "batch_size": 4,
              "checkpoint": folder, "progress": False, **SMALL}
    first = train_dictionary(local_model, "layers.1.ln2", TEXTS, limit=8, **kwargs)
    resumed = train_dictionary(local_model, "layers.1.ln2", TEXTS, limit=20, **kwargs)
    assert resumed.steps > first.steps
    assert resumed.history[:first.steps] == first.history
    copy = SparseDictionary.load(tmp_path / "ckpt" / "dictionary")
    x = torch.randn(6, local_model.d_model)
    assert torch.equal(copy(x), resumed.dictionary(x))
