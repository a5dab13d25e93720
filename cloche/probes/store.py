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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cloche.errors import ResourceLimit, UsageError
from cloche.probes.reducers import Reducer

if TYPE_CHECKING:
    from cloche.probes.journal import Journal


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
        # for entries written by the ranks of a sharded model: where each fell in the order one
        # process would have written them (parallel to ``entries[key]``; see sharding.stage)
        self.order: dict[str, list[tuple[int, ...]]] = {}
        self.state: dict[str, Any] = {}
        self.reducers: dict[str, Reducer] = {}
        self.num_runs = 0
        self.num_examples = 0

    @property
    def nbytes(self) -> int:
        return (
            sum(tensor_nbytes(v) for v in self.entries.values())
            + tensor_nbytes(self.state)
            + sum(r.nbytes for r in self.reducers.values())
        )


@dataclass
class Change:
    """What one commit does to one save context (reducers: their state after the merge).

    A journal writes it to disk before the commit becomes visible.
    """

    name: str
    entries: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    reducers: dict[str, Reducer] = field(default_factory=dict)
    state: dict[str, Any] | None = None  # None: unchanged
    runs: int = 0
    examples: int = 0
    order: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)


class PendingWrites:
    """What one run has written to one save context so far (not yet visible to anybody)."""

    def __init__(self, transaction: Transaction, committed: SaveContext) -> None:
        self._transaction = transaction
        self._committed = committed
        self.saves: dict[str, list[torch.Tensor]] = {}
        self.order: dict[str, list[tuple[int, ...]]] = {}
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

    def save(self, key: str, value: Any, order: tuple[int, ...] | None = None) -> None:
        """Stage ``value`` under ``key``; ``order`` places it among other ranks' entries."""
        if not isinstance(key, str) or not key:
            raise UsageError(f"save keys are non-empty strings, not {key!r}")
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        value = own_tensor(value)
        self._transaction.charge(tensor_nbytes(value), self._committed.name)
        self.saves.setdefault(key, []).append(value)
        if order is not None:
            self.order.setdefault(key, []).append(order)

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
    """All writes of one run (or one dataset run) to any number of save contexts.

    ``tag`` names the transaction in the journal (the ranks of a sharded model tag theirs alike,
    so a restarted group can tell which of them committed it).
    """

    def __init__(self, store: SaveStore, tag: str | None = None) -> None:
        self._store = store
        self.tag = tag
        self._pending: dict[str, PendingWrites] = {}
        self._charged = 0
        self._charged_under: dict[str, int] = {}  # per quota prefix

    def writes(self, name: str) -> PendingWrites:
        pending = self._pending.get(name)
        if pending is None:
            # a context that does not exist yet is created by the commit, never by a run that
            # is rolled back
            committed = self._store.find(name)
            pending = PendingWrites(self, committed if committed is not None else SaveContext(name))
            self._pending[name] = pending
        return pending

    def charge(self, nbytes: int, name: str = "") -> None:
        """Account ``nbytes`` more of staged data for context ``name``; refuse past the store's
        limit or the quota of a prefix of ``name``."""
        self._charged += nbytes
        limit = self._store.max_bytes
        if limit is not None and self._store.nbytes() + self._charged > limit:
            raise ResourceLimit(
                f"saved data would exceed this model's limit of {limit} bytes (max_saved_bytes)"
                f" ({self._store.nbytes()} held, this run adds {self._charged});"
                " fetch and clear save contexts, or save less (slice before ctx.save)"
            )
        for prefix, quota in self._store.quotas_of(name):
            charged = self._charged_under[prefix] = self._charged_under.get(prefix, 0) + nbytes
            held = self._store.nbytes(prefix)
            if held + charged > quota.max_bytes:
                raise ResourceLimit(
                    f"saved data would exceed the limit of {quota.label}: {quota.max_bytes}"
                    f" bytes ({held} held, this run adds {charged}); fetch and clear save"
                    " contexts, or save less (slice before ctx.save)")

    def commit(self) -> None:
        """Make the writes visible — after the journal, if the store has one, has them on disk."""
        with self._store.lock:
            journal = self._store.journal
            for name, pending in self._pending.items():
                found = self._store.find(name)
                ctx = found if found is not None else SaveContext(name)
                if journal is not None:
                    # on disk first (the merged reducer states), then in memory
                    merged = {r: _merged(ctx.reducers.get(r), staged)
                              for r, staged in pending.reducers.items()}
                    journal.record(Change(name, pending.saves, merged, pending._state,
                                          pending.runs, pending.examples, pending.order),
                                   ctx, tag=self.tag)
                    ctx.reducers.update(merged)
                else:
                    for rname, staged in pending.reducers.items():
                        if rname in ctx.reducers:
                            ctx.reducers[rname].merge(staged)
                        else:
                            ctx.reducers[rname] = staged
                for key, values in pending.saves.items():
                    ctx.entries.setdefault(key, []).extend(values)
                for key, order in pending.order.items():
                    ctx.order.setdefault(key, []).extend(order)
                if pending._state is not None:
                    ctx.state = pending._state
                ctx.num_runs += pending.runs
                ctx.num_examples += pending.examples
                if found is None:  # created by this commit, now that nothing can fail it
                    self._store.put_new(ctx)
        self._pending.clear()

    def rollback(self) -> None:
        self._pending.clear()


def _merged(committed: Reducer | None, staged: Reducer) -> Reducer:
    """``committed`` merged with ``staged``, as a new reducer (``committed`` is left as it is)."""
    if committed is None:
        return staged
    return committed.empty_like().merge(committed).merge(staged)


@dataclass(frozen=True)
class Quota:
    """A cap on the bytes of the contexts under one name prefix."""

    max_bytes: int
    label: str


class SaveStore:
    """All save contexts held by one model (one rank), with an optional memory cap.

    With a ``journal`` (``probes.journal``), every commit is written to disk before it becomes
    visible, and the contexts on disk are loaded now: the store survives a crash.
    """

    def __init__(self, max_bytes: int | None = None, journal: Journal | None = None) -> None:
        self.max_bytes = max_bytes
        self.lock = threading.RLock()
        self._contexts: dict[str, SaveContext] = {}
        self._quotas: dict[str, Quota] = {}
        self.journal = journal
        if journal is not None:
            for ctx in journal.load():
                self._contexts[ctx.name] = ctx

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

    def put_new(self, ctx: SaveContext) -> None:
        """Register a context a commit created (already on disk, if there is a journal)."""
        with self.lock:
            self._contexts[ctx.name] = ctx

    def put(self, ctx: SaveContext) -> None:
        """Install ``ctx`` under its name, replacing what was there (restore from a file)."""
        with self.lock:
            if self.journal is not None:
                self.journal.replace(ctx)
            self._contexts[ctx.name] = ctx

    def drop(self, name: str) -> None:
        with self.lock:
            if self.journal is not None:
                self.journal.drop(name)
            self._contexts.pop(name, None)

    def undo_after(self, committed: str | None) -> list[str]:
        """Take back the journaled commits tagged later than ``committed`` (names changed).

        A sharded group that stopped in the middle of a commit calls this on every rank when it
        restarts, so that all ranks hold the transactions rank 0 recorded as whole, and no more.
        """
        if self.journal is None:
            return []
        with self.lock:
            changed = self.journal.undo_after(committed)
            for name, ctx in changed.items():
                if ctx is None:
                    self._contexts.pop(name, None)
                else:
                    self._contexts[name] = ctx
            return sorted(changed)

    def nbytes(self, prefix: str = "") -> int:
        """Bytes held by the contexts whose names start with ``prefix``."""
        with self.lock:
            return sum(ctx.nbytes for name, ctx in self._contexts.items()
                       if name.startswith(prefix))

    def set_quota(self, prefix: str, max_bytes: int | None, label: str) -> None:
        """Cap the bytes held by contexts named ``prefix...`` (None lifts it); ``label`` names
        the cap in the error (a server caps each principal's contexts so)."""
        with self.lock:
            if max_bytes is None:
                self._quotas.pop(prefix, None)
            else:
                self._quotas[prefix] = Quota(max_bytes, label)

    def quotas_of(self, name: str) -> list[tuple[str, Quota]]:
        with self.lock:
            return [(p, q) for p, q in self._quotas.items() if name.startswith(p)]

    def begin(self, tag: str | None = None) -> Transaction:
        return Transaction(self, tag)

    def __iter__(self) -> Iterator[SaveContext]:
        with self.lock:
            return iter(list(self._contexts.values()))
