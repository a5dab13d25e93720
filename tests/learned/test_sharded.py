"""Linear probes, steering vectors and DAS rotations on a model sharded over 2 gloo ranks: each
trains on the rank of its point (rank 0 or rank 1) and comes out as it does from the
single-process model; nothing is left behind on any rank, and the weights are untouched."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.learned import (
    interchange_accuracy,
    live,
    target_logprob,
    train_das,
    train_linear_probe,
    train_steering_vector,
)
from cloche.sharding.launch import start_local

from tests.dictionaries.conftest import tiny4_dir  # noqa: F401
from tests.learned.test_steering import weights_digest
from tests.sharding.conftest import TIMEOUT_S
from tests.threads import TORCH_THREADS

pytestmark = pytest.mark.slow

#: one point on each rank (rank 0 runs blocks 0-1, rank 1 blocks 2-3)
POINTS = ["layers.1.resid_post", "layers.3.resid_pre"]
_GEN = torch.Generator().manual_seed(0)
EXAMPLES = [torch.randint(3, 40, (10,), generator=_GEN) for _ in range(40)]
IN_SET = torch.arange(3, 40, 2)
PROMPTS = [torch.randint(3, 90, (6,), generator=_GEN) for _ in range(6)]
TARGET = [7, 11]


def in_set(ctx, x):
    """Whether each token is odd, computed next to the model."""
    return torch.isin(ctx.tokens, IN_SET.to(ctx.tokens.device)).long()


@pytest.fixture(scope="module")
def pair(tiny4_dir):  # noqa: F811
    directory = tiny4_dir("llama")
    model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()


def _nothing_left(sharded) -> None:
    assert sharded.call(lambda m: live.running(), rank="all") == {0: [], 1: []}
    grads = sharded.call(lambda m: [n for n, p in m.hf_model.named_parameters()
                                    if p.grad is not None], rank="all")
    assert grads == {0: [], 1: []}


@pytest.mark.parametrize("point", POINTS)
def test_a_linear_probe_matches_the_single_process_one(pair, point):
    local, sharded = pair
    assert sharded.owner_of(point) == POINTS.index(point)
    data = Dataset(EXAMPLES, name="ids", seq_len=10, pad_id=2)
    want = train_linear_probe(local, point, data, in_set, batch_size=8, steps=50,
                              progress=False)
    got = train_linear_probe(sharded, point, data, in_set, batch_size=8, steps=50,
                             progress=False)
    assert (got.n_train, got.n_heldout) == (want.n_train, want.n_heldout)
    assert got.accuracy == pytest.approx(want.accuracy, abs=0.02)
    torch.testing.assert_close(got.weight, want.weight, atol=5e-2, rtol=5e-2)
    _nothing_left(sharded)


@pytest.mark.parametrize("point", POINTS)
def test_a_steering_vector_matches_the_single_process_one(pair, point):
    local, sharded = pair
    before = sharded.call(weights_digest, rank="all")
    want = train_steering_vector(local, point, PROMPTS, TARGET, steps=6, lr=0.05,
                                 batch_size=3)
    got = train_steering_vector(sharded, point, PROMPTS, TARGET, steps=6, lr=0.05,
                                batch_size=3)
    assert got.steps == want.steps == 6
    torch.testing.assert_close(got.vector, want.vector, atol=1e-4, rtol=1e-3)
    assert sharded.call(weights_digest, rank="all") == before
    _nothing_left(sharded)
    steered = target_logprob(sharded, PROMPTS, TARGET, probes={point: got.steer()})
    torch.testing.assert_close(
        steered, target_logprob(local, PROMPTS, TARGET, probes={point: want.steer()}),
        atol=1e-4, rtol=1e-4)
    assert float(steered.mean()) > float(target_logprob(sharded, PROMPTS, TARGET).mean())


@pytest.mark.parametrize("point", POINTS)
def test_a_das_rotation_matches_the_single_process_one(pair, point):
    local, sharded = pair
    bases, sources = PROMPTS[:3], PROMPTS[3:]
    targets = [5, 9, 13]
    before = sharded.call(weights_digest, rank="all")
    want = train_das(local, point, bases, sources, targets, dim=2, steps=5, lr=0.05)
    got = train_das(sharded, point, bases, sources, targets, dim=2, steps=5, lr=0.05)
    assert got.steps == want.steps == 5
    torch.testing.assert_close(got.weight, want.weight, atol=1e-4, rtol=1e-3)
    assert sharded.call(weights_digest, rank="all") == before
    _nothing_left(sharded)
    assert interchange_accuracy(sharded, point, bases, sources, targets, got.intervene()) == \
        interchange_accuracy(local, point, bases, sources, targets, want.intervene())


def test_a_failure_on_the_owning_rank_leaves_nothing_behind(pair):
    _, sharded = pair
    data = Dataset(EXAMPLES[:8], name="ids", seq_len=10, pad_id=2)
    with pytest.raises(cloche.ClocheError, match="labels must be"):
        train_linear_probe(sharded, POINTS[1], data, lambda ctx, x: torch.zeros(3),
                           progress=False)
    _nothing_left(sharded)
