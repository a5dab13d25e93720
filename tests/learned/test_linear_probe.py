"""Linear probes trained where their point lives recover a planted linear signal (whether a
token is in a set) with held-out accuracy far above chance, locally and on a server, and are
usable afterwards as a probe that saves its predictions."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.errors import ClocheError, UsageError
from cloche.learned import LinearProbe, train_linear_probe

_GEN = torch.Generator().manual_seed(0)
#: token ids 3..30 (fewer than the width 32 + 1, so any labelling of them is linearly separable)
EXAMPLES = [torch.randint(3, 31, (12,), generator=_GEN) for _ in range(60)]
IN_SET = torch.randperm(28, generator=_GEN)[:14] + 3
DATA = Dataset(EXAMPLES, name="ids", seq_len=12, pad_id=1)


def in_set(ctx, x):
    """The planted label: 1 where the token is in ``IN_SET``, computed next to the model."""
    return torch.isin(ctx.tokens, IN_SET.to(ctx.tokens.device)).long()


@pytest.fixture(scope="module")
def local_model(server_model_dir):
    return cloche.load(server_model_dir)


def _check(probe: LinearProbe, model) -> None:
    assert probe.n_train > 400 and probe.n_heldout > 100
    assert probe.chance < 0.65
    assert probe.accuracy > 0.9, (probe.accuracy, probe.chance)
    # usable as a probe: its saved predictions are the planted labels
    ids = EXAMPLES[0].unsqueeze(0)
    model.run(ids, probes={probe.point: probe.read("pred")}, save="probe-read", progress=False)
    try:
        predicted = model.save_context("probe-read").fetch("pred")
    finally:
        model.save_context("probe-read").clear()
    truth = torch.isin(ids, IN_SET).long()
    assert (predicted.reshape(truth.shape) == truth).double().mean() > 0.9


@pytest.mark.parametrize("point", ["embed", "layers.0.resid_post"])
def test_a_planted_signal_is_recovered_on_held_out_examples(local_model, point):
    probe = train_linear_probe(local_model, point, DATA, in_set, progress=False)
    assert probe.point == local_model.resolve(point) and probe.classes == 2
    _check(probe, local_model)


def test_a_held_out_dataset_and_labels_per_example(local_model):
    # one label per example, read at its last token: is that token in the set?
    labels = [int(torch.isin(e[-1], IN_SET)) for e in EXAMPLES]
    train, held = Dataset(EXAMPLES[:45], name="a", seq_len=12, pad_id=1), \
        Dataset(EXAMPLES[45:], name="b", seq_len=12, pad_id=1)
    probe = train_linear_probe(local_model, "embed", train, labels[:45], heldout=held,
                               heldout_labels=labels[45:], progress=False)
    assert probe.n_train == 45 and probe.n_heldout == 15
    assert probe.train_accuracy == 1.0
    assert probe.accuracy > 0.8  # the same token types, at other examples


def test_bad_labels_are_refused_and_nothing_is_left_behind(local_model):
    with pytest.raises(ClocheError, match="labels must be"):
        train_linear_probe(local_model, "embed", DATA, lambda ctx, x: torch.zeros(3),
                           progress=False)
    with pytest.raises(UsageError, match="heldout"):
        train_linear_probe(local_model, "embed", DATA, in_set, heldout=1.5, progress=False)
    from cloche.learned import live

    assert local_model.call(lambda m: live.running()) == []
    probe = train_linear_probe(local_model, "embed", DATA, in_set, progress=False)
    assert probe.accuracy > 0.9  # the model keeps working


def test_training_on_a_server(served):
    with cloche.connect(served.address, token=served.token) as model:
        probe = train_linear_probe(model, "layers.0.resid_post", DATA, in_set, progress=False)
        _check(probe, model)
        from cloche.learned import live

        assert model.call(lambda m: live.running()) == []
