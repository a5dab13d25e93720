"""How rank 0 reads many keys of a save context from one rank: a few replies of bounded size."""

from __future__ import annotations

from cloche.sharding.executor import _READ_BYTES, _read_groups

MB = 2**20


def test_keys_are_read_in_order_in_groups_of_bounded_size():
    counts = {f"k{i}": 1 for i in range(40)}
    summary = {"keys": counts, "nbytes": 40 * 4 * MB}  # 4 MB per entry
    groups = _read_groups(list(counts), summary)
    assert [key for group in groups for key in group] == list(counts)
    assert all(len(group) * 4 * MB <= _READ_BYTES for group in groups)
    assert len(groups) == 40 * 4 * MB // _READ_BYTES


def test_a_key_bigger_than_the_budget_is_read_alone_and_small_contexts_at_once():
    summary = {"keys": {"big": 8, "a": 1, "b": 1}, "nbytes": 10 * 3 * MB}
    assert _read_groups(["a", "big", "b"], summary) == [["a"], ["big"], ["b"]]
    small = {"keys": {"a": 2, "b": 3}, "nbytes": 1000}
    assert _read_groups(["a", "b"], small) == [["a", "b"]]
    assert _read_groups([], small) == []
    assert _read_groups(["a"], None) == [["a"]]
