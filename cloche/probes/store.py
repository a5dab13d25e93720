"""Save contexts: named, stateful, server-side stores that live across runs.

Every run writes through a :class:`Transaction`. ``ctx.save``, ``ctx.state`` and ``ctx.reduce``
stage their writes in the transaction; the save context changes only when the run finishes
(``commit``). A run that raises or is cancelled is rolled back and leaves every context exactly
as it was — so a Ctrl-C never leaves half a batch of activations behind. Reductions stage into a
fresh reducer of the same configuration that is merged into the committed one at commit time,
which is the same ``merge`` that later combines ranks.

Saved values stay tensors on the device they were made on until somebody fetches them.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Iterator
from typing import Any

import torch

from cloche.errors import ResourceLimit, UsageError
from cloche.probes.reducers import Reducer


def tensor_nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_nbytes(v) for v in value)
    return 0


def own_tensor(value: torch.Tensor) -> torch.Tensor:
    """A detached tensor that owns exactly its storage (a view of a larger tensor is copied)."""
    value = value.detach()
    if value._base is not None or value.untyped_storage().nbytes() > tensor_nbytes(value):
        value = value.clone()
    return value


class SaveContext:
    """The committed contents of one save context."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.entries: dict[str, list[torch.Tensor]] = {}
        self.state: dict[str, Any] = {}
        self.reducers: dict[str, Reducer] = {}
        self.num_runs = 0
        self.num_examples = 0

    def nbytes(self) -> int:
        return (
            sum(tensor_nbytes(v) for v in self.entries.values())
            + tensor_nbytes(self.state)
            + sum(r.nbytes() for r in self.reducers.values())
        )


class PendingWrites:
    """What one run has written to one save context so far (not yet visible to anybody)."""

    def __init__(self, transaction: Transaction, committed: SaveContext) -> None:
        self._transaction = transaction
        self._committed = committed
        self.saves: dict[str, list[torch.Tensor]] = {}
        self.reducers: dict[str, Reducer] = {}
        self._state: dict[str, Any] | None = None
        self.runs = 0
        self.examples = 0

    @property
    def run_index(self) -> int:
        return self._committed.num_runs + self.runs

    @property
    def examples_seen(self) -> int:
        """Rows this context has seen in plain runs: the ids given to the next batch's rows."""
        return self._committed.num_examples + self.examples

    @property
    def state(self) -> dict[str, Any]:
        if self._state is None:
            self._state = copy.deepcopy(self._committed.state)
        return self._state

    def save(self, key: str, value: Any) -> None:
        if not isinstance(key, str) or not key:
            raise UsageError(f"save keys are non-empty strings, not {key!r}")
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        value = own_tensor(value)
        self._transaction.charge(tensor_nbytes(value))
        self.saves.setdefault(key, []).append(value)

    def reduce(self, name: str, x: torch.Tensor, reducer: Reducer | None, *,
               example_ids: torch.Tensor | None, mask: torch.Tensor | None) -> Reducer:
        staged = self.reducers.get(name)
        if staged is None:
            template = self._committed.reducers.get(name)
            if template is None:
                template = reducer
            if template is None:
                raise UsageError(f"reducer {name!r} does not exist yet: pass a reducer to create"
                                 " it")
            staged = template.empty_like()
            self.reducers[name] = staged
        if reducer is not None and (reducer.kind, reducer.config()) != (staged.kind,
                                                                         staged.config()):
            raise UsageError(
                f"reducer {name!r} already holds a {staged.kind} with config {staged.config()};"
                f" got {reducer.kind} with {reducer.config()} (use another name or clear the"
                " context)"
            )
        staged.update(x.detach(), example_ids=example_ids, mask=mask)
        return staged


class Transaction:
    """All writes of one run (or one dataset run) to any number of save contexts."""

    def __init__(self, store: SaveStore) -> None:
        self._store = store
        self._pending: dict[str, PendingWrites] = {}
        self._charged = 0

    def writes(self, name: str) -> PendingWrites:
        pending = self._pending.get(name)
        if pending is None:
            # a context that does not exist yet is created by the commit, never by a run that
            # is rolled back
            committed = self._store.find(name)
            pending = PendingWrites(self, committed if committed is not None else SaveContext(name))
            self._pending[name] = pending
        return pending

    def charge(self, nbytes: int) -> None:
        """Account ``nbytes`` more of staged data; refuse past the store's limit."""
        self._charged += nbytes
        limit = self._store.max_bytes
        if limit is not None and self._store.nbytes() + self._charged > limit:
            raise ResourceLimit(
                f"saved data would exceed the server's limit of {limit} bytes"
                f" ({self._store.nbytes()} held, this run adds {self._charged});"
                " fetch and clear save contexts, or save less (slice before ctx.save)"
            )

    def commit(self) -> None:
        with self._store.lock:
            for name, pending in self._pending.items():
                ctx = self._store.get(name)
                for key, values in pending.saves.items():
                    ctx.entries.setdefault(key, []).extend(values)
                if pending._state is not None:
                    ctx.state = pending._state
                for rname, staged in pending.reducers.items():
                    if rname in ctx.reducers:
                        ctx.reducers[rname].merge(staged)
                    else:
                        ctx.reducers[rname] = staged
                ctx.num_runs += pending.runs
                ctx.num_examples += pending.examples
        self._pending.clear()

    def rollback(self) -> None:
        self._pending.clear()


class SaveStore:
    """All save contexts held by one model (one rank), with an optional memory cap."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self._contexts: dict[str, SaveContext] = {}

    def get(self, name: str) -> SaveContext:
        with self.lock:
            ctx = self._contexts.get(name)
            if ctx is None:
                ctx = self._contexts[name] = SaveContext(name)
            return ctx

    def find(self, name: str) -> SaveContext | None:
        with self.lock:
            return self._contexts.get(name)

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self._contexts)

    def put(self, ctx: SaveContext) -> None:
        """Install ``ctx`` under its name, replacing what was there (restore from a file)."""
        with self.lock:
            self._contexts[ctx.name] = ctx

    def drop(self, name: str) -> None:
        with self.lock:
            self._contexts.pop(name, None)

    def nbytes(self) -> int:
        with self.lock:
            return sum(ctx.nbytes() for ctx in self._contexts.values())

    def begin(self) -> Transaction:
        return Transaction(self)

    def __iter__(self) -> Iterator[SaveContext]:
        with self.lock:
            return iter(list(self._contexts.values()))
