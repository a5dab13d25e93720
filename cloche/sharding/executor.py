"""Rank 0's executor for a model sharded by layers over many ranks.

:class:`ShardedExecutor` executes the model API's request records by sending each as a command to
every rank and letting each rank's :class:`~cloche.sharding.stage.Stage` do its part; behind
:class:`cloche.Model` (and a server) a client cannot tell the world size.

Commands are serialised (one at a time); reads of committed data (fetch, keys, state, param)
go on a separate *light* channel so they are never stuck behind a long run. When a rank is
lost, the request in flight raises :class:`~cloche.errors.WorkerLost` naming the rank, every
later request does too, and ``on_lost`` is called (the launcher exits the process).

A save context has a part on every rank (probes write where their point lives): reads gather
only what was asked — ``fetch`` of a key held by one rank slices and casts it there; a key
written on several ranks is gathered and put back in single-process order; reducers of one
name are merged across ranks with the same ``merge`` that merges batches.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import cloudpickle
import torch

from cloche import errors
from cloche.api import requests as rq
from cloche.api.executor import (
    CancelEvent,
    EventSink,
    Executor,
    dispatch,
    needs_a_server,
    submit_in_thread,
)
from cloche.api.futures import RequestFuture
from cloche.api.model import Model
from cloche.errors import ClocheError, UsageError, WorkerLost
from cloche.errors.payload import from_payload
from cloche.model.info import ModelInfo, describe
from cloche.model.points import ProbePoint
from cloche.model.weights import WeightCatalog, expert_count
from cloche.probes.actions import join_entries
from cloche.probes.disk import read_context, write_context
from cloche.probes.reducers import Reducer, reducer_from_state
from cloche.probes.store import SaveContext
from cloche.runtime.derived import DerivedPoints, is_derived, make_derived
from cloche.runtime.usercode import run_user_function
from cloche.sharding.channel_keys import keys
from cloche.sharding.control import Control
from cloche.sharding.framing import frame
from cloche.sharding.p2p import open_channel
from cloche.sharding.sealing import seal
from cloche.sharding.stage import TRANSACTIONAL, Command, Stage, error_envelope
from cloche.sharding.worker import Rank

if TYPE_CHECKING:
    from cloche.sharding.launch import LocalGroup

__all__ = ["ShardedExecutor"]

T = TypeVar("T")




class ShardedExecutor:
    """A model sharded by layers over ``world_size`` ranks; this object lives on rank 0.

    ``micro_batches`` is the default for requests that leave it unset.
    """

    def __init__(self, rank: Rank, *, on_lost: Callable[[WorkerLost], None] | None = None,
                 micro_batches: int = 1) -> None:
        if rank.layout.rank != 0:
            raise UsageError(f"ShardedExecutor lives on rank 0, not rank {rank.layout.rank}")
        self._rank = rank
        self._stage = rank.stage
        self._control = rank.control
        self._channel = rank.channel
        self._lock = threading.RLock()
        self._seq = 0
        self._light_lock = threading.Lock()
        self._light_seq = [0] * rank.layout.world_size
        # which keys each rank holds, per save context: asked once per context between commands
        self._summary_lock = threading.Lock()
        self._summary_cache: dict[str, list[dict[str, Any] | None]] = {}
        self._summary_generation = 0
        light_control = Control(rank.layout.new_store_client(), None, 0,
                                rank.layout.world_size, rank.config.timeout_s,
                                rank.config.heartbeat_s)
        light_control.liveness = self._control.liveness  # one view of who is alive
        self._key = rank.layout.key
        self._light_channel = open_channel(light_control, rank.layout, announce=False)
        self._broken: WorkerLost | None = None
        self._on_lost = on_lost
        self._shapes: dict[str, Any] | None = None
        self._closed = False
        self.micro_batches = micro_batches
        self._local = self._stage.local
        self.plan = self._stage.plan
        self.world_size = rank.layout.world_size
        #: the worker processes, when started by cloche.sharding.launch
        self.group: LocalGroup | None = None
        self._on_close: list[Callable[[], None]] = []
        self._specs = self._stage.full_specs
        #: the attached dictionaries' descriptions (each module lives on its point's rank)
        self._derived = DerivedPoints()
        self._info: ModelInfo | None = None
        self._weights: WeightCatalog | None = None
        self._facade: Model | None = None
        self._control.on_lost = self._lost
        self._control.watch_idle = True
        self._journal = self._local.store.journal
        self._launch = self._launch_number()
        if self._journal is not None:
            self.reconcile()

    # ----------------------------------------------------------------- description
    @property
    def tokenizer(self) -> Any:
        return self._local.tokenizer

    @property
    def config(self) -> Any:
        return self._local.config

    @property
    def name(self) -> str:
        return self._local.name

    @property
    def device(self) -> torch.device:
        return self._rank.layout.device

    @property
    def facade(self) -> Model:
        if self._facade is None:
            self._facade = Model(self)
        return self._facade

    def describe(self) -> ModelInfo:
        if self._info is None:
            self._info = describe(self.config, self._stage.adapter, name=self.name,
                                  device=self.device,
                                  point_names=[*self._specs, *self._derived.names()],
                                  world_size=self.world_size,
                                  layers_per_rank=self.plan.layers_per_rank(),
                                  lm_head=self._local.lm_head)
        return self._info

    def probe_points(self) -> list[ProbePoint]:
        if self._shapes is None:
            shapes: dict[str, Any] = {}
            for found in self._command("shapes"):
                shapes.update(found)
            self._shapes = shapes
        return [*(ProbePoint(s.name, s.kind, s.layer, self._shapes.get(s.name),
                             s.site.module if s.site else None) for s in self._specs.values()),
                *self._derived.probe_points(self._shapes, lambda p: self._specs[p].layer)]

    def owner_of(self, point: str) -> int:
        """The rank that runs probes at canonical point ``point``."""
        if is_derived(point):
            point = self._derived.base_of(point)
        spec = self._specs.get(point)
        if spec is None:
            raise errors.UnknownProbePoint(f"unknown probe point {point!r}")
        return self._stage.ownership.point_owner(spec)

    # ----------------------------------------------------------------- the seam
    def execute(self, request: rq.Request[T], *, cancel: CancelEvent | None = None,
                on_event: EventSink | None = None) -> T:
        return dispatch(self._HANDLERS, self, request, cancel, on_event)

    def submit(self, request: rq.Request[T], *, on_event: EventSink | None = None
               ) -> RequestFuture[T]:
        return submit_in_thread(self, request, on_event)

    # ----------------------------------------------------------------- commands
    def _lost(self, exc: WorkerLost) -> None:
        if self._broken is None:
            self._broken = exc
        if self._on_lost is not None and not self._closed:
            threading.Thread(target=self._on_lost, args=(exc,), daemon=True).start()

    def _command(self, op: str, *, cancel: Any = None, local: dict | None = None,
                 after: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        with self._lock, self._changing_contexts():
            if self._broken is not None:
                raise WorkerLost(f"this sharded model is unusable: {self._broken.message}",
                                 rank=self._broken.rank)
            if self._closed:
                raise UsageError("the sharded model was closed")
            seq = self._seq + 1
            txn = f"{self._launch:020d}:{seq:012d}" if op in TRANSACTIONAL else None
            cmd = Command(seq, op, kwargs, txn)
            try:  # tensors (token ids, a probe's captured vectors) ride beside the pickle
                sealed = frame(self._key, f"cmd/{seq}", cmd, code=True).numpy().tobytes()
            except Exception as exc:  # the sequence number stays unused: ranks wait for it
                raise UsageError(f"cannot ship the {op} request to the other ranks: {exc}"
                                 ) from exc
            self._seq = seq
            store = self._control.store
            try:
                for r in range(1, self.world_size):
                    self._channel.post(r, f"cmd/{seq}", sealed)
                self._control.begin(seq, cancel)
                try:
                    envelopes = [self._stage.execute(cmd, **(local or {}))]
                    own_error = self._stage.last_exception
                    extra = None
                    if envelopes[0]["ok"] and after is not None:
                        try:
                            extra = after()
                        except WorkerLost:
                            raise
                        except Exception as exc:  # noqa: BLE001 - reported like rank 0's own
                            own_error = exc
                            envelopes[0] = error_envelope(
                                exc, aborted=isinstance(exc, errors.Aborted), rank=0)
                    envelopes.extend(self._channel.recv_object(r, keys.result(seq, r),
                                                               abortable=False)
                                     for r in range(1, self.world_size))
                finally:
                    self._control.end()
                self._channel.done(f"cmd/{seq}")
                store.delete_key(f"abort/{seq}")
            except WorkerLost as exc:
                self._lost(exc)
                raise
            ok = all(e["ok"] for e in envelopes)
            if txn is not None:
                self._settle(seq, txn, ok)
            if not ok:
                raise self._failure(envelopes, own_error)
            values = [e["value"] for e in envelopes]
            return (values, extra) if after is not None else values

    def _settle(self, seq: int, txn: str, ok: bool) -> None:
        """Commit (or roll back) transaction ``txn`` on every rank, rank 0 last.

        Rank 0 publishes the decision, waits until every worker applied it, and only then
        applies its own and records ``txn`` as committed. A rank lost in between leaves rank 0's
        part rolled back and no record: a restart with the same state directory takes the
        workers' parts back too (``reconcile``), so a run that failed with ``WorkerLost`` is on
        no rank, as a failed run must be.
        """
        try:
            for r in range(1, self.world_size):
                self._channel.post(r, f"decide/{seq}", b"1" if ok else b"0")
        except WorkerLost as exc:
            self._lost(exc)
            self._stage.settle(seq, False)
            raise
        except RuntimeError as exc:
            lost = WorkerLost(f"the control store failed: {exc}", rank=0)
            self._lost(lost)
            self._stage.settle(seq, False)
            raise lost from exc
        try:
            self._await_settled(seq)
        except WorkerLost:
            self._stage.settle(seq, False)
            raise
        self._stage.settle(seq, ok)
        if ok and self._journal is not None:
            self._journal.mark_committed(txn)

    def _launch_number(self) -> int:
        """A number larger than that of every launch whose commits the state directory holds."""
        now = time.time_ns()
        committed = self._journal.committed() if self._journal is not None else None
        return now if committed is None else max(now, int(committed.split(":")[0]) + 1)

    def reconcile(self) -> list[str]:
        """Make every rank hold exactly the transactions rank 0 recorded as committed.

        Run when a sharded model starts on a state directory: a group stopped between a
        worker's commit and rank 0's record (a rank killed, the machine lost) would otherwise
        come back with ranks that disagree. Returns the contexts that changed on any rank.
        """
        committed = self._journal.committed() if self._journal is not None else None
        changed = self._command("undo_after", committed=committed)
        return sorted({name for names in changed for name in names})

    def _await_settled(self, seq: int) -> None:
        """Wait until every worker applied the decision, so reads that follow see it."""
        try:
            for r in range(1, self.world_size):
                self._channel.take(r, f"settled/{seq}/{r}")
                self._channel.done(f"settled/{seq}/{r}")
            self._channel.done(f"decide/{seq}")  # every worker read it before it settled
        except WorkerLost as exc:
            self._lost(exc)
            raise
        except RuntimeError as exc:
            lost = WorkerLost(f"the control store failed: {exc}", rank=0)
            self._lost(lost)
            raise lost from exc

    def _failure(self, envelopes: list[dict], own: BaseException | None) -> ClocheError:
        """The error to raise for a command that failed somewhere: the first root cause.

        Ranks that stopped only because another failed report ``aborted``; rank 0's own
        exception is raised as it is (with its local traceback).
        """
        failed = [(r, e) for r, e in enumerate(envelopes) if not e["ok"]]
        roots = [(r, e) for r, e in failed if not e.get("aborted")]
        rank, env = (roots or failed)[0]
        if rank == 0 and isinstance(own, ClocheError) and not isinstance(own, errors.Aborted):
            return own
        if not roots:
            return errors.Cancelled("the request was cancelled", rank=rank)
        err = from_payload(env["error"])
        err.rank = rank
        if rank == 0:
            err.remote_traceback = None
            err.__cause__ = own
        return err

    # ----------------------------------------------------------------- running
    def _micro(self, n: int | None) -> int:
        return self.micro_batches if n is None else n

    def _run(self, req: rq.Run, cancel: CancelEvent | None, on_event: Any) -> rq.RunOutput:
        last = self.plan.last

        def receive_logits() -> torch.Tensor:
            return self._channel.recv(last, keys.final_logits(self._seq))

        want = req.return_logits and self._local.lm_head  # a base model has no logits
        after = receive_logits if want else None
        result = self._command(
            "run", cancel=cancel, after=after, ids=req.ids, mask=req.mask, forward=req.forward,
            backward_probes=req.backward_probes, save=req.save, backward=req.backward,
            return_logits=want, return_loss=req.return_loss,
            micro_batches=self._micro(req.micro_batches))
        values, logits = result if after is not None else (result, None)
        return rq.RunOutput(logits=None if logits is None else logits.cpu(),
                            loss=values[last]["loss"])

    def _generate(self, req: rq.Generate, cancel: CancelEvent | None, on_event: Any
                  ) -> torch.Tensor:
        values = self._command("generate", cancel=cancel, ids=req.ids, mask=req.mask,
                               forward=req.forward, save=req.save, options=req.options,
                               seed=req.seed)
        return values[0]

    def _run_dataset(self, req: rq.RunDataset, cancel: CancelEvent | None,
                     on_event: EventSink | None) -> dict[str, Any]:
        """Batches stream through the pipeline, so ranks work on consecutive batches at once;
        with ``checkpoint_every`` every rank checkpoints its part (``sharding.checkpoints``);
        an export is written by the ranks that own its points (``sharding.export``)."""
        from cloche.runtime.datasets import as_dataset
        from cloche.sharding.export import export_summary, open_sharded_export

        ds = as_dataset(req.dataset, self.tokenizer, cancel)
        export = open_sharded_export(req, self.owner_of)
        values = self._command("dataset", cancel=cancel,
                               local={"progress": on_event, "cancel": cancel},
                               dataset=ds, batch_size=req.batch_size, limit=req.limit,
                               forward=req.forward, save=req.save,
                               micro_batches=self._micro(req.micro_batches),
                               checkpoint_every=req.checkpoint_every, resume=req.resume,
                               export=export)
        reducers = self._context_reducers(req.save)
        out = {k: v for k, v in values[0].items() if k != "export"}
        out.update({"dataset": ds.name, "fingerprint": ds.fingerprint(),
                    "reducers": {r: red.result() for r, red in reducers.items()},
                    "state": self._context_state(req.save)})
        if export is not None:
            out["export"] = export_summary(export["dir"], [v["export"] for v in values])
        return out

    def _call(self, req: rq.Call, cancel: CancelEvent | None, on_event: Any) -> Any:
        """``rank=None``: here, with the whole sharded model; ``rank=k``/``"all"``: on those
        ranks, each with its shard (a ``cloche.Model`` holding only its blocks)."""
        if req.rank is None:
            return run_user_function(req.fn, self.facade, req.args, req.kwargs)
        if req.rank == "all":
            targets = list(range(self.world_size))
        elif isinstance(req.rank, int) and 0 <= req.rank < self.world_size:
            targets = [req.rank]
        else:
            raise UsageError(f"rank must be None, 'all' or an int in [0, {self.world_size}),"
                             f" not {req.rank!r}")
        values = self._command("call", fn=req.fn, args=req.args, kwargs=req.kwargs,
                               targets=targets)
        if req.rank == "all":
            return dict(enumerate(values))
        return values[req.rank]

    # ----------------------------------------------------------------- dictionaries
    def _attach_dictionary(self, req: rq.AttachDictionary, cancel: Any, on_event: Any
                           ) -> dict[str, Any]:
        """Checked here (rank 0 builds it once to read it), kept by the point's rank."""
        self.probe_points()  # the shapes the dictionary is checked against
        assert self._shapes is not None
        probe = make_derived(req.name, req.point, req.build(req.config, req.weights, req.path),
                             self._specs, self.describe().missing, self._shapes, rank=0,
                             device=None, owned=False, out_point=req.out_point)
        if probe.out_base is not None and self.owner_of(probe.out_base) != self.owner_of(
                probe.base):
            raise UsageError(f"transcoder {req.name!r} reads {probe.base!r} (rank"
                             f" {self.owner_of(probe.base)}) and writes {probe.out_base!r} (rank"
                             f" {self.owner_of(probe.out_base)}): both must be on one rank")
        values = self._command("attach_dictionary", name=req.name, point=probe.base,
                               out_point=probe.out_base, build=req.build, config=req.config,
                               weights=req.weights, path=req.path)
        summary = values[0]
        probe.summary = summary
        self._derived.attach(probe)
        self._info = None
        return dict(summary)

    def _detach_dictionary(self, req: rq.DetachDictionary, cancel: Any, on_event: Any) -> None:
        self._derived.detach(req.name)
        self._info = None
        self._command("detach_dictionary", name=req.name)

    # ----------------------------------------------------------------- save contexts
    def _context_names(self) -> list[str]:
        names: set[str] = set()
        for found in self._ctx("", "names"):
            names.update(found)
        return sorted(names)

    def _summaries(self, name: str) -> list[dict[str, Any] | None]:
        """Every rank's summary of save context ``name`` (its keys, runs, bytes).

        Kept until the next command ends: only commands change committed data, so fetching
        each of a context's keys costs one read on the rank that holds it, not one more on
        every rank to find it. A summary read while a command runs is not kept.
        """
        with self._summary_lock:
            cached = self._summary_cache.get(name)
            generation = self._summary_generation
        if cached is not None:
            return cached
        found = self._ctx(name, "summary")
        with self._summary_lock:
            if generation == self._summary_generation:
                self._summary_cache[name] = found
        return found

    @contextlib.contextmanager
    def _changing_contexts(self) -> Iterator[None]:
        """Around a command: summaries kept before it, or read while it runs, are dropped."""
        try:
            yield
        finally:
            with self._summary_lock:
                self._summary_generation += 1
                self._summary_cache.clear()

    def _context_keys(self, name: str) -> list[str]:
        found: set[str] = set()
        for summary in self._summaries(name):
            if summary:
                found.update(summary["keys"])
        return sorted(found)

    def _context_fetch(self, name: str, key: str, mode: str, ops: Any) -> Any:
        """The entries under ``key`` — computed where they live when one rank holds them all."""
        holders = [r for r, s in enumerate(self._summaries(name)) if s and key in s["keys"]]
        if not holders:
            raise UsageError(f"save context {name!r} has no key {key!r}"
                             f" (keys: {self._context_keys(name)})")
        if len(holders) == 1:
            (rank,) = holders
            return self._ctx(name, "fetch", key, mode, ops, ranks=[rank])[rank]
        parts = self._ctx(name, "entries", key, ranks=holders)
        ordered = sorted((tuple(o), v) for part in parts if part
                         for o, v in zip(part["order"], part["values"], strict=True))
        return join_entries([v for _, v in ordered], mode, key, ops)

    def _context_fetch_many(self, name: str, keys: list[str] | None, mode: str
                            ) -> dict[str, Any]:
        """Several keys at once: per rank, a few reads for the keys it alone holds (grouped by
        :func:`_read_groups`), in key order."""
        summaries = self._summaries(name)
        wanted = self._context_keys(name) if keys is None else list(dict.fromkeys(keys))
        holders = {key: [r for r, s in enumerate(summaries) if s and key in s["keys"]]
                   for key in wanted}
        missing = [key for key, ranks in holders.items() if not ranks]
        if missing:
            raise UsageError(f"save context {name!r} has no key(s) {missing}"
                             f" (keys: {self._context_keys(name)})")
        found: dict[str, Any] = {}
        for rank in range(self.world_size):
            alone = [key for key, ranks in holders.items() if ranks == [rank]]
            for group in _read_groups(alone, summaries[rank]):
                found.update(self._ctx(name, "fetch_many", group, mode, ranks=[rank])[rank])
        for key, ranks in holders.items():
            if len(ranks) > 1:
                found[key] = self._context_fetch(name, key, mode, None)
        return {key: found[key] for key in wanted}

    def _context_state(self, name: str) -> dict[str, Any]:
        """``ctx.state`` is per rank; this is their union (a later rank wins a shared key)."""
        merged: dict[str, Any] = {}
        for part in self._ctx(name, "state"):
            merged.update(part or {})
        return merged

    def _context_reducers(self, name: str) -> dict[str, Reducer]:
        merged: dict[str, Reducer] = {}
        for part in self._ctx(name, "reducers"):
            for rname, state in (part or {}).items():
                reducer = reducer_from_state(state)
                if rname in merged:
                    merged[rname].merge(reducer)
                else:
                    merged[rname] = reducer
        return merged

    def _gathered(self, name: str) -> SaveContext:
        ctx = SaveContext(name)
        ctx.num_runs = max((s["num_runs"] for s in self._summaries(name) if s), default=0)
        for key in self._context_keys(name):
            ctx.entries[key] = self._context_fetch(name, key, "list", None)
        ctx.state = copy.deepcopy(self._context_state(name))
        ctx.reducers = self._context_reducers(name)
        return ctx

    def _context(self, req: rq.Context, cancel: Any, on_event: Any) -> Any:
        name, action, args = req.name, req.action, tuple(req.args)
        if action == "keys":
            return self._context_keys(name)
        if action == "fetch":
            return self._context_fetch(name, *args)
        if action == "fetch_many":
            return self._context_fetch_many(name, *args)
        if action == "state":
            return self._context_state(name)
        if action == "num_runs":
            return max((s["num_runs"] for s in self._summaries(name) if s), default=0)
        if action == "reducers":
            return self._context_reducers(name)
        if action == "result":
            (rname,) = args
            reducers = self._context_reducers(name)
            if rname not in reducers:
                raise UsageError(f"save context {name!r} has no reducer {rname!r}")
            return reducers[rname].result()
        if action == "nbytes":
            return sum(s["nbytes"] for s in self._summaries(name) if s)
        if action == "clear":
            self._ctx(name, "clear")
            return None
        if action == "persist":  # gathered from every rank into one file
            (path,) = args
            write_context(self._gathered(name), path)
            return None
        if action == "restore":  # the restored context then lives on rank 0
            (path,) = args
            ctx = read_context(path, name)
            self._ctx(name, "clear")
            self._ctx(name, "put", ctx, ranks=[0])
            return None
        raise UsageError(f"unknown save-context action {action!r}")

    def _ctx(self, name: str, action: str, *args: Any, ranks: list[int] | None = None) -> list:
        kwargs: dict[str, Any] = {"name": name, "action": action, "args": args, "ranks": ranks}
        if action in Stage.LIGHT_ACTIONS:
            return self._light("ctx", kwargs, ranks)
        return self._command("ctx", **kwargs)

    def _light(self, op: str, kwargs: dict[str, Any], ranks: list[int] | None = None) -> list:
        """A read-only request, answered beside a running command (see worker.LightService)."""
        targets = list(range(self.world_size)) if ranks is None else list(ranks)
        with self._light_lock:
            if self._broken is not None:
                raise WorkerLost(f"this sharded model is unusable: {self._broken.message}",
                                 rank=self._broken.rank)
            if self._closed:
                raise UsageError("the sharded model was closed")
            payload = cloudpickle.dumps((op, kwargs))
            values: list[Any] = [None] * self.world_size
            sent = []
            try:
                for r in targets:
                    if r == 0:
                        continue
                    self._light_seq[r] += 1
                    name = f"light/{r}/{self._light_seq[r]}"
                    self._light_channel.post(r, name, seal(self._key, name, payload))
                    sent.append((r, self._light_seq[r]))
                if 0 in targets:
                    values[0] = self._stage.light(op, kwargs)
                replies = [(r, self._light_channel.recv_object(r, keys.light(r, n),
                                                               abortable=False))
                           for r, n in sent]
            except WorkerLost as exc:
                self._lost(exc)
                raise
        for r, reply in replies:
            if not reply["ok"]:
                raise self._failure([{"ok": True}] * r + [reply], None)
            values[r] = reply["value"]
        return values

    # ----------------------------------------------------------------- weights
    def _set_quota(self, req: rq.Quota) -> None:
        self._command("quota", prefix=req.prefix, max_bytes=req.max_bytes, label=req.label)

    def _catalog(self) -> WeightCatalog:
        if self._weights is None:
            self._weights = WeightCatalog(self._stage.adapter, self.plan.n_layers,
                                          self._stage.all_param_names,
                                          expert_count(self._stage.config))
        return self._weights

    def _param(self, req: rq.Param, cancel: Any, on_event: Any) -> torch.Tensor:
        """A weight (or its gradient) from the rank that holds it."""
        if is_derived(req.name):  # a dictionary's weight: on the rank of its point
            owner = self.owner_of(self._derived.named(req.name).point("features"))
        else:
            raw, _ = self._catalog().resolve(req.name)
            owner = self._stage.ownership.param_owner(raw)
        if owner == 0:
            return self._local.param(req.name, req.grad, req.index)
        return self._light("param", {"name": req.name, "grad": req.grad, "index": req.index,
                                     "target": owner}, [owner])[owner]

    # ----------------------------------------------------------------- lifecycle
    def ping_ranks(self) -> list[int]:
        """Every rank's answer to a no-op command (a liveness check)."""
        return self._command("ping")

    def close(self) -> None:
        """Tell every rank to exit, then leave the group."""
        if self._closed:
            return
        try:
            if self._broken is None:
                self._command("shutdown")
        except ClocheError:
            pass  # a rank already gone: nothing more to tell it
        finally:
            self._closed = True
            self._rank.close()
            for callback in self._on_close:
                callback()

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` after :meth:`close` (the launcher reaps its processes there)."""
        self._on_close.append(callback)

    _HANDLERS: ClassVar[dict[type, Callable[..., Any]]] = {
        rq.Run: _run,
        rq.Generate: _generate,
        rq.RunDataset: _run_dataset,
        rq.Call: _call,
        rq.Context: _context,
        rq.Describe: lambda self, req, c, e: self.describe(),
        rq.ProbePoints: lambda self, req, c, e: self.probe_points(),
        rq.Owner: lambda self, req, c, e: self.owner_of(req.point),
        rq.AttachDictionary: _attach_dictionary,
        rq.DetachDictionary: _detach_dictionary,
        rq.Dictionaries: lambda self, req, c, e: self._derived.summaries(),
        rq.Param: _param,
        rq.Quota: lambda self, req, c, e: self._set_quota(req),
        rq.ParamNames: lambda self, req, c, e: self._catalog().names(req.canonical),
        rq.ListContexts: lambda self, req, c, e: self._context_names(),
        rq.Config: lambda self, req, c, e: self.config.to_dict(),
        rq.TokenizerFiles: lambda self, req, c, e: self._local.tokenizer_files(),
        rq.Ping: lambda self, req, c, e: req.value,
        rq.ServerStatus: needs_a_server,
    }

    def __repr__(self) -> str:
        return (f"ShardedExecutor({self.name!r}, world_size={self.world_size},"
                f" layers_per_rank={self.plan.layers_per_rank()})")


if TYPE_CHECKING:  # mypy: this class is an Executor
    def _is_executor(executor: ShardedExecutor) -> Executor:
        return executor


#: a reply of more than ~32 MB lands in freshly mapped pages on both ranks each time (glibc
#: maps such blocks anew and unmaps them when freed): a capture read as one 35 MB reply cost
#: ~30 ms more CPU than read key by key. Keys are read in groups of about this many bytes.
_READ_BYTES = 16 * 2**20


def _read_groups(keys: list[str], summary: dict[str, Any] | None) -> list[list[str]]:
    """``keys`` (held by one rank) cut into groups of about ``_READ_BYTES``, estimated from
    the rank's summary (its bytes spread evenly over its entries)."""
    if not keys or not summary:
        return [keys] if keys else []
    per_entry = summary["nbytes"] / max(1, sum(summary["keys"].values()))
    groups: list[list[str]] = [[]]
    size = 0.0
    for key in keys:
        cost = per_entry * summary["keys"].get(key, 1)
        if groups[-1] and size + cost > _READ_BYTES:
            groups.append([])
            size = 0.0
        groups[-1].append(key)
        size += cost
    return groups
