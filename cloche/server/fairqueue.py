"""A fair queue for model work: weighted round-robin across groups (principals), round-robin
across lanes (sessions) within a group, FIFO within a lane.

One session submitting a hundred runs cannot starve another that submits one, and one
principal opening ten sessions cannot starve another that opens one: the worker takes a turn
from each group in order (``weight`` turns in a row for a group of that weight), and within a
group the next job of each session in turn. ``positions`` tells every waiting job how many jobs
run before it, so clients can show their place in the line. Pure data structure plus a
condition variable; it knows nothing of sockets or models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


@dataclass
class _Group(Generic[T]):
    weight: int = 1
    used: int = 0  # turns taken in this round
    lanes: OrderedDict[Hashable, deque[T]] = field(default_factory=OrderedDict)

    def copy(self) -> _Group[T]:
        return _Group(self.weight, self.used,
                      OrderedDict((k, deque(v)) for k, v in self.lanes.items()))


def _take(groups: OrderedDict[Hashable, _Group[T]]) -> T:
    """Take the next item from non-empty ``groups`` (the one order that ``get`` and
    ``positions`` share)."""
    name, group = next(iter(groups.items()))
    key, items = next(iter(group.lanes.items()))
    item = items.popleft()
    if items:
        group.lanes.move_to_end(key)
    else:
        del group.lanes[key]
    group.used += 1
    if not group.lanes:
        del groups[name]
    elif group.used >= group.weight:
        group.used = 0
        groups.move_to_end(name)
    return item


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._groups: OrderedDict[Hashable, _Group[T]] = OrderedDict()
        self._group_of: dict[Hashable, Hashable] = {}  # lane -> its group, while it has items
        self._cond = threading.Condition()
        self._closed = False

    def put(self, key: Hashable, item: T, *, group: Hashable | None = None,
            weight: int = 1) -> None:
        """Queue ``item`` in lane ``key`` of ``group`` (default: a group of its own). A lane
        that still holds items stays in the group it is in."""
        group = key if group is None else group
        with self._cond:
            group = self._group_of.get(key, group)
            entry = self._groups.get(group)
            if entry is None:
                entry = self._groups[group] = _Group(weight)
            entry.weight = weight
            entry.lanes.setdefault(key, deque()).append(item)
            self._group_of[key] = group
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The next item in fair order; None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._groups or self._closed, timeout):
                return None
            if self._closed:
                return None
            group = next(iter(self._groups.values()))
            key = next(iter(group.lanes))  # the lane _take serves
            item = _take(self._groups)
            if key not in group.lanes:
                del self._group_of[key]
            return item

    def _lane(self, key: Hashable) -> tuple[Hashable, _Group[T], deque[T]] | None:
        name = self._group_of.get(key)
        group = self._groups.get(name) if name is not None else None
        if group is None or key not in group.lanes:
            return None
        return name, group, group.lanes[key]

    def _tidy(self, name: Hashable, group: _Group[T], key: Hashable) -> None:
        """Drop lane ``key`` once empty, and its group once that has no lanes."""
        if group.lanes[key]:
            return
        del group.lanes[key]
        del self._group_of[key]
        if not group.lanes:
            del self._groups[name]

    def take_each_other(self, key: Hashable, wanted: Callable[[T], bool]) -> list[T]:
        """The first waiting item of every *other* lane, where it is ``wanted`` (taken out).

        What a long job of lane ``key`` serves between two of its steps: one item per other
        lane, in queue order.
        """
        taken: list[T] = []
        with self._cond:
            lanes = [(name, group, lane) for name, group in self._groups.items()
                     for lane, items in group.lanes.items()
                     if lane != key and items and wanted(items[0])]
            for name, group, lane in lanes:
                taken.append(group.lanes[lane].popleft())
                self._tidy(name, group, lane)
        return taken

    def remove(self, key: Hashable, item: T) -> bool:
        """Take a waiting item out (a cancel); False if it is no longer waiting."""
        with self._cond:
            found = self._lane(key)
            if found is None or item not in found[2]:
                return False
            name, group, items = found
            items.remove(item)
            self._tidy(name, group, key)
            return True

    def positions(self) -> list[tuple[T, int]]:
        """Every waiting item with its 1-based place in the order the worker will take them."""
        with self._cond:
            groups = OrderedDict((name, g.copy()) for name, g in self._groups.items())
        order: list[tuple[T, int]] = []
        while groups:
            order.append((_take(groups), len(order) + 1))
        return order

    def __len__(self) -> int:
        with self._cond:
            return sum(len(items) for g in self._groups.values() for items in g.lanes.values())

    def close(self) -> list[T]:
        """Stop handing out items; returns the ones still waiting."""
        with self._cond:
            self._closed = True
            left = [item for g in self._groups.values() for items in g.lanes.values()
                    for item in items]
            self._groups.clear()
            self._group_of.clear()
            self._cond.notify_all()
            return left
