"""Steering vectors optimised where their point lives raise the target's log-probability on
held-out prompts, leave the model's weights exactly as they were, and are usable afterwards as
a probe. Locally on the shipped default model (a trained one) and on a server."""

from __future__ import annotations

import hashlib

import cloche
import pytest
import torch
from cloche.default_model import weights_dir
from cloche.errors import UsageError
from cloche.learned import live, target_logprob, train_steering_vector

PROMPTS = [f"the {w} sat on the" for w in ("cat", "dog", "bird", "fox", "cow", "hat", "mat",
                                          "tree")]
HELD_OUT = [f"a {w} ran to the" for w in ("cat", "dog", "bird", "fox")]
TARGET = " road"


def weights_digest(model) -> str:
    """A digest of every parameter, computed next to the model."""
    digest = hashlib.sha256()
    for name, p in sorted(model.hf_model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _train_and_measure(model, steps: int) -> tuple[float, float, object]:
    before = model.call(weights_digest)
    vector = train_steering_vector(model, "layers.1.resid_pre", PROMPTS, TARGET, steps=steps,
                                   lr=0.1)
    assert vector.steps == steps and vector.vector.dim() == 1
    assert model.call(weights_digest) == before  # only the vector trained
    assert model.call(lambda m: [n for n, p in m.hf_model.named_parameters()
                                 if p.grad is not None]) == []
    assert model.call(lambda m: live.running()) == []
    clean = float(target_logprob(model, HELD_OUT, TARGET).mean())
    steered = float(target_logprob(model, HELD_OUT, TARGET,
                                   probes={vector.point: vector.steer()}).mean())
    return clean, steered, vector


def test_the_target_becomes_likely_on_held_out_prompts():
    model = cloche.load(weights_dir())
    clean, steered, vector = _train_and_measure(model, steps=40)
    assert steered > clean + 5.0, (clean, steered)  # measured: -12.9 -> -0.26 nats
    # half the vector does half-way; reading it saves each token's projection
    half = float(target_logprob(model, HELD_OUT, TARGET,
                                probes={vector.point: vector.steer(0.5)}).mean())
    assert clean < half < steered
    model.run(HELD_OUT[0], probes={vector.point: vector.read("along")}, save="steer-read",
              progress=False)
    try:
        along = model.save_context("steer-read").fetch("along")
    finally:
        model.save_context("steer-read").clear()
    assert along.numel() == len(model.tokenize(HELD_OUT[0]))


def test_bad_input_is_refused():
    model = cloche.load(weights_dir())
    with pytest.raises(UsageError, match="steps"):
        train_steering_vector(model, "layers.1.resid_pre", PROMPTS, TARGET, steps=0)
    with pytest.raises(UsageError, match="prompt"):
        train_steering_vector(model, "layers.1.resid_pre", [], TARGET)


def test_training_on_a_server(served):
    with cloche.connect(served.address, token=served.token) as model:
        # the served model is untrained (near-uniform logits behind a final layer norm): the
        # most a vector can do is smaller; measured about 1 nat
        clean, steered, _ = _train_and_measure(model, steps=20)
        assert steered > clean + 0.5, (clean, steered)
