"""``Pool.launch``: one server per checkpoint, one experiment over all, results keyed by step.

The checkpoints are the shipped default model saved at several steps of fine-tuning on one
text, as a training run would save them.
"""

from __future__ import annotations

import cloche
import pytest
import torch
import transformers
from cloche.client import Pool
from cloche.client.pool import Results

from tests.model.hf_cache import add_snapshot, use_cache
from tests.threads import TORCH_THREADS

TEXT = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat."
STEPS = (0, 3, 6)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """``{step: directory}``: the default model fine-tuned on TEXT, saved at STEPS."""
    from cloche.default_model import weights_dir

    source = weights_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    saved = {}
    for step in range(max(STEPS) + 1):
        if step in STEPS:
            directory = tmp_path_factory.mktemp(f"step{step}")
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            saved[step] = directory
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return saved


def _loss(model) -> float:
    return model.run(TEXT).loss


def _saver(ctx, x):
    ctx.save("x", x)


def _activations(model, point: str) -> torch.Tensor:
    model.save_context("x").clear()
    model.run(TEXT, probes={point: _saver}, save="x")
    return model.save_context("x").fetch("x")


@pytest.mark.slow
def test_one_experiment_over_checkpoints_keyed_by_step_with_a_plot(checkpoints, tmp_path):
    with Pool.launch(checkpoints, threads=TORCH_THREADS) as pool:
        assert pool.keys == list(STEPS) and len(pool) == 3
        losses = pool.each(_loss)
        acts = pool.each(_activations, "layers.1.mlp.post")
        servers = [server._proc for server in pool._servers]
    assert all(p.poll() is not None for p in servers)  # closing the pool stopped them
    assert isinstance(losses, Results) and list(losses) == list(STEPS)
    for step, directory in checkpoints.items():  # each server served its own checkpoint
        local = cloche.load(directory)
        assert losses[step] == local.run(TEXT).loss
        assert torch.equal(acts[step], _activations(local, "layers.1.mlp.post"))
    assert losses[0] > losses[3] > losses[6]  # training on TEXT lowers its loss
    ax = losses.plot(ylabel="loss on the fine-tuning text", title="default model")
    xs, ys = ax.lines[0].get_data()
    assert list(xs) == list(STEPS) and list(ys) == [losses[s] for s in STEPS]
    ax.figure.savefig(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_one_server_per_revision_of_a_hub_model(checkpoints, monkeypatch, tmp_path):
    """Revisions of one hub repository (an offline cache laid out by hand): steps as tags."""
    cache = use_cache(monkeypatch, tmp_path / "hf-home")
    for step in (0, 6):
        add_snapshot(cache, "org/training-run", checkpoints[step], refs=(f"step{step}",))
    with Pool.launch("org/training-run", revisions=["step0", "step6"],
                     threads=TORCH_THREADS) as pool:
        losses = pool.each(_loss)
    assert list(losses) == ["step0", "step6"]
    for step in (0, 6):
        assert losses[f"step{step}"] == cloche.load(checkpoints[step]).run(TEXT).loss
    ax = losses.plot(xlabel="revision")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["step0", "step6"]


@pytest.mark.slow
def test_a_checkpoint_that_cannot_start_is_named_and_the_others_are_stopped(checkpoints,
                                                                            tmp_path):
    with pytest.raises(cloche.errors.ConnectionError, match=r"did not start.*not a model directory"):
        Pool.launch({0: checkpoints[0], 1: tmp_path / "missing"}, threads=TORCH_THREADS)
    with pytest.raises(cloche.UsageError, match="revisions= needs one hub model name"):
        Pool.launch([checkpoints[0]], revisions=["main"])


def test_a_pool_of_running_servers_keyed_by_name(served):
    with Pool({"first": served.address}, token=served.token) as pool:
        names = pool.each(lambda m: m.n_layers)
    assert names == {"first": 2}
    with pytest.raises(cloche.UsageError, match="no results to plot"):
        Results().plot()
