"""A fair queue for model work: round-robin across sessions, FIFO within a session.

One session submitting a hundred runs cannot starve another that submits one: the worker takes
the next job of each session in turn. ``positions`` tells every waiting job how many jobs run
before it, so clients can show their place in the line. Pure data structure plus a condition
variable; it knows nothing of sockets or models.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["FairQueue"]

T = TypeVar("T")


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, key: Hashable, item: T) -> None:
        with self._cond:
            self._queues.setdefault(key, deque()).append(item)
            self._cond.notify()

    def get(self, timeout: float | None = None) -> T | None:
        """The next item in round-robin order; None on timeout or once closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._queues or self._closed, timeout):
                return None
            if self._closed:
                return None
            key, items = next(iter(self._queues.items()))
            item = items.popleft()
            if items:
                self._queues.move_to_end(key)
            else:
                del self._queues[key]
            return item

    def take_each_other(self, key: Hashable, wanted: Callable[[T], bool]) -> list[T]:
        """The first waiting item of every *other* lane, where it is ``wanted`` (taken out).

        What a long job of lane ``key`` serves between two of its steps: one item per other
        lane, in round-robin order.
        """
        taken: list[T] = []
        with self._cond:
            for lane in list(self._queues):
                items = self._queues[lane]
                if lane == key or not items or not wanted(items[0]):
                    continue
                taken.append(items.popleft())
                if not items:
                    del self._queues[lane]
        return taken

    def remove(self, key: Hashable, item: T) -> bool:
        """Take a waiting item out (a cancel); False if it is no longer waiting."""
        with self._cond:
            items = self._queues.get(key)
            if items is None or item not in items:
                return False
            items.remove(item)
            if not items:
                del self._queues[key]
            return True

    def positions(self) -> list[tuple[T, int]]:
        """Every waiting item with its 1-based place in the order the worker will take them."""
        with self._cond:
            lanes = [list(items) for items in self._queues.values()]
        order: list[tuple[T, int]] = []
        depth = 0
        while True:
            row = [lane[depth] for lane in lanes if depth < len(lane)]
            if not row:
                return order
            base = len(order)
            order.extend([(item, base + i + 1) for i, item in enumerate(row)])
            depth += 1

    def __len__(self) -> int:
        with self._cond:
            return sum(len(items) for items in self._queues.values())

    def close(self) -> list[T]:
        """Stop handing out items; returns the ones still waiting."""
        with self._cond:
            self._closed = True
            left = [item for items in self._queues.values() for item in items]
            self._queues.clear()
            self._cond.notify_all()
            return left
