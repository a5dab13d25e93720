"""A DAS rotation trained where its point lives: the interchange through its subspace carries
the source's prediction into held-out base prompts far more often than a random subspace of the
same size, its rows stay orthonormal, and the weights are untouched."""

from __future__ import annotations

import random

import cloche
import pytest
import torch
from cloche.default_model import weights_dir
from cloche.learned import DasRotation, interchange_accuracy, live, train_das

from tests.learned.test_steering import weights_digest

POINT = "layers.1.resid_post"


def _task(model, n_prompts: int = 40, n_pairs: int = 150):
    """Random prompts; the counterfactual target of (base, source) is the source's own next
    token (what patching the whole point at the last token gives), so a subspace that carries
    the prediction exists; pairs whose bases already predict it are left out."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 200, (8,), generator=generator) for _ in range(n_prompts)]
    predicted = [int(i) for i in model.run(torch.stack(prompts), progress=False
                                           ).logits[:, -1].argmax(-1)]
    rng = random.Random(0)
    pairs = [(rng.randrange(n_prompts), rng.randrange(n_prompts)) for _ in range(n_pairs)]
    pairs = [(a, b) for a, b in pairs if predicted[a] != predicted[b]]

    def split(chosen):
        return ([prompts[a] for a, _ in chosen], [prompts[b] for _, b in chosen],
                [predicted[b] for _, b in chosen])
    return split(pairs[:64]), split(pairs[64:])


def _orthonormal(weight: torch.Tensor) -> bool:
    return bool(torch.allclose(weight @ weight.T, torch.eye(weight.shape[0]), atol=1e-4))


@pytest.mark.slow
def test_the_subspace_carries_the_prediction_on_held_out_pairs():
    model = cloche.load(weights_dir())
    train, held = _task(model)
    before = model.call(weights_digest)
    rotation = train_das(model, POINT, *train, dim=32, steps=80, lr=0.05, batch_size=32)
    assert model.call(weights_digest) == before
    assert model.call(lambda m: live.running()) == []
    assert rotation.weight.shape == (32, 128) and _orthonormal(rotation.weight)
    torch.manual_seed(1)
    random_rows = torch.nn.utils.parametrizations.orthogonal(
        torch.nn.Linear(128, 32, bias=False)).weight.detach()
    chance = interchange_accuracy(model, POINT, *held, DasRotation(POINT, random_rows, 0)
                                  .intervene())
    learned = interchange_accuracy(model, POINT, *held, rotation.intervene())
    assert interchange_accuracy(model, POINT, *held, None) == 0.0
    assert learned > chance + 0.15, (chance, learned)  # measured: 0.01 -> 0.32


def test_training_on_a_server(served):
    with cloche.connect(served.address, token=served.token) as model:
        train, _ = _task(model, n_prompts=12, n_pairs=40)
        before = model.call(weights_digest)
        rotation = train_das(model, POINT, *train, dim=4, steps=3, batch_size=8)
        assert rotation.steps == 3 and _orthonormal(rotation.weight)
        assert model.call(weights_digest) == before
        assert model.call(lambda m: live.running()) == []
        # the rotation reads as a probe: 4 coordinates per token
        model.run(train[0][0], probes={POINT: rotation.read("das")}, save="das-read",
                  progress=False)
        try:
            assert model.save_context("das-read").fetch("das").shape[-1] == 4
        finally:
            model.save_context("das-read").clear()


def test_the_same_seed_trains_the_same_rotation():
    """The orthogonal parametrization completes its base with random columns: seeded too."""
    model = cloche.load(weights_dir())
    train, _ = _task(model, n_prompts=12, n_pairs=40)
    first, second = (train_das(model, POINT, *train, dim=4, steps=2, batch_size=8, seed=3)
                     for _ in range(2))
    assert torch.equal(first.weight, second.weight)
