"""The sharding plan: balanced by parameters, explicit overrides, errors that name the value."""

from __future__ import annotations

import pytest
from cloche.errors import UsageError
from cloche.sharding.plan import ShardPlan, balanced_plan, plan_from_counts
from cloche.sharding.shard import Ownership, make_plan, skeleton
from hypothesis import given, settings
from hypothesis import strategies as st


def test_equal_blocks_split_evenly_and_heavy_ends_get_fewer_blocks():
    assert balanced_plan(2, [10] * 4).layers_per_rank() == [2, 2]
    assert balanced_plan(4, [10] * 8).layers_per_rank() == [2, 2, 2, 2]
    # a large embedding on rank 0 and unembedding on the last rank push blocks to the middle
    plan = balanced_plan(3, [10] * 9, head_params=25, tail_params=25)
    assert plan.layers_per_rank() == [2, 5, 2]


@settings(deadline=None)  # the exact search is quick, but CI machines are busy
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=12), st.integers(1, 12),
       st.integers(0, 3000), st.integers(0, 3000))
def test_balanced_plan_is_contiguous_and_optimal(blocks, world, head, tail):
    if world > len(blocks):
        with pytest.raises(UsageError, match=rf"world_size \({world}\)"):
            balanced_plan(world, blocks)
        return
    plan = balanced_plan(world, blocks, head_params=head, tail_params=tail)
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == len(blocks)
    loads = [sum(blocks[a:b]) for a, b in plan.ranges]
    loads[0] += head
    loads[-1] += tail
    # no single block moved across one boundary makes the largest load smaller
    for r in range(world - 1):
        for shift in (-1, 1):
            counts = plan.layers_per_rank()
            counts[r] += shift
            counts[r + 1] -= shift
            if min(counts) < 1:
                continue
            other = plan_from_counts(len(blocks), counts)
            other_loads = [sum(blocks[a:b]) for a, b in other.ranges]
            other_loads[0] += head
            other_loads[-1] += tail
            assert max(other_loads) >= max(loads)


def test_layers_per_rank_override_and_its_errors():
    assert balanced_plan(3, [1] * 6, layers_per_rank=[1, 2, 3]).ranges == ((0, 1), (1, 3), (3, 6))
    with pytest.raises(UsageError, match=r"sums to 5, but the model has 6"):
        plan_from_counts(6, [1, 1, 3])
    with pytest.raises(UsageError, match=r"layers_per_rank\[1\] \(0\)"):
        plan_from_counts(6, [3, 0, 3])
    with pytest.raises(UsageError, match=r"has 2 entries; world_size is 3"):
        balanced_plan(3, [1] * 6, layers_per_rank=[3, 3])
    with pytest.raises(UsageError, match=r"owns blocks \[2, 2\)"):
        ShardPlan(n_layers=4, ranges=((0, 2), (2, 2), (2, 4)))


def test_ownership_of_points_and_weights(tiny_dir):
    sk = skeleton(tiny_dir("llama"))
    plan = make_plan(sk, 2)
    own = Ownership(sk, plan)
    assert plan.layers_per_rank() == [1, 1]
    assert own.module_owner("model.embed_tokens") == 0
    assert own.module_owner("model.layers.1.mlp") == 1
    assert own.module_owner("model.norm") == 1 and own.module_owner("lm_head") == 1
    assert own.param_owner("model.layers.0.self_attn.q_proj.weight") == 0
    assert own.param_owner("lm_head.weight") == 1
