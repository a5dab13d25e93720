"""One rank's part of every command: the local runtime, run on this rank's shard.

Every rank — rank 0 included — executes each command with a :class:`Stage`. A forward pass is
the Hugging Face model's own ``forward()`` on the shard; the stubs call back into the stage to
receive the previous rank's hidden state, ship this rank's on, and stand in for logits. Probes
are attached only at the points this rank owns. A backward pass runs rank by rank from the
last: each rank backprops the gradient it received into its shard and sends the gradient of its
input on. Writes to save contexts are staged in a transaction that is committed (or rolled
back) only when rank 0 has heard from every rank — so a run that fails or is cancelled on any
rank leaves every rank's contexts as they were. A generation is driven by rank 0 alone: the
other ranks run their shard once per decode step (``sharding.decode``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cloche.api.inputs import next_token_loss
from cloche.api.progress import silenced
from cloche.api.results import Outputs
from cloche.errors import Aborted, Cancelled, UsageError
from cloche.errors.payload import to_payload
from cloche.model.info import no_head_message
from cloche.model.points import PointSpec, build_specs
from cloche.probes.actions import context_action, entries
from cloche.probes.context import RunInfo
from cloche.probes.journal import Journal
from cloche.probes.store import PendingWrites, SaveStore, Transaction
from cloche.runtime.derived import make_derived
from cloche.runtime.executor import SHAPES_CONTEXT, LocalExecutor
from cloche.runtime.head import head_kwargs
from cloche.runtime.hooks import Attachment, ProbeFn, ProbePlan
from cloche.runtime.interrupt import interruptible
from cloche.runtime.shapes import probe_ids, shape_reader
from cloche.runtime.usercode import backward_objective, run_user_function
from cloche.sharding.channel_keys import keys
from cloche.sharding.control import Control
from cloche.sharding.decode import Follower, Step, StepRecorder
from cloche.sharding.p2p import AnyChannel
from cloche.sharding.plan import ShardPlan
from cloche.sharding.shard import Ownership, Skeleton, build_shard

__all__ = ["Command", "Stage", "error_envelope"]


@dataclass
class Command:
    """What rank 0 asks of every rank (a transactional one is settled by ``decide/{seq}``)."""

    seq: int
    op: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    txn: str | None = None  # a transactional command's tag in every rank's journal


#: the commands whose writes every rank commits, or none does (settled by ``decide/{seq}``)
TRANSACTIONAL = ("run", "generate", "dataset")


OrderKey = tuple[int, int, int, int, int]

_USE_CACHE: dict[type, bool] = {}


def _accepts_use_cache(hf_model: Any) -> bool:
    cls = type(hf_model)
    if cls not in _USE_CACHE:
        try:
            _USE_CACHE[cls] = "use_cache" in inspect.signature(hf_model.forward).parameters
        except (TypeError, ValueError):
            _USE_CACHE[cls] = False
    return _USE_CACHE[cls]


@dataclass(frozen=True)
class _DatasetRun:
    """What ``runtime.datasets.Resumable`` reads of a dataset request, on every rank."""

    save: str
    checkpoint_every: int | None
    resume: bool
    batch_size: int
    limit: int | None
    micro_batches: int


class OrderedWrites:
    """A run's pending writes, remembering where each ``ctx.save`` fell in the global order.

    Saves of one run happen on several ranks; the key (run, pass, phase, rank, n) — stored with
    each entry, so it survives a restart — sorts them into the order a single process would have
    produced (runs in order, forward passes in rank order, backward passes in reverse rank order).
    """

    def __init__(self, pending: PendingWrites, stage: Stage) -> None:
        self._pending = pending
        self._stage = stage
        self._n = 0

    @property
    def run_index(self) -> int:
        return self._pending.run_index

    @property
    def state(self) -> dict[str, Any]:
        return self._pending.state

    @property
    def examples_seen(self) -> int:
        return self._pending.examples_seen

    @property
    def examples(self) -> int:
        return self._pending.examples

    @examples.setter
    def examples(self, value: int) -> None:
        self._pending.examples = value

    @property
    def runs(self) -> int:
        return self._pending.runs

    @runs.setter
    def runs(self, value: int) -> None:
        self._pending.runs = value

    def restored(self, saves: int) -> None:
        """A resumed run: ``saves`` entries were saved before its checkpoint."""
        self._n = saves

    def save(self, key: str, value: Any) -> None:
        self._n += 1
        self._pending.save(key, value, self._stage.order_key(self.run_index, self._n))

    def reduce(self, *args: Any, **kwargs: Any) -> Any:
        return self._pending.reduce(*args, **kwargs)


def error_envelope(exc: BaseException, *, aborted: bool, rank: int | None = None
                   ) -> dict[str, Any]:
    """A rank's failure as plain data (``cloche.errors.payload``, as on the wire).

    ``aborted``: this rank stopped because another rank failed (not a root cause).
    """
    return {"ok": False, "aborted": aborted, "error": to_payload(exc, None, rank=rank)}


class Stage:
    """This rank's shard and the code that runs commands on it."""

    def __init__(self, sk: Skeleton, plan: ShardPlan, rank: int, device: torch.device,
                 control: Control, channel: AnyChannel, *, state_dir: str | None = None) -> None:
        self.rank = rank
        self.plan = plan
        self.last = plan.last
        self.device = device
        self.control = control
        self.channel = channel
        self.adapter = sk.adapter
        self.ownership = Ownership(sk, plan)
        self.full_specs: dict[str, PointSpec] = build_specs(sk.meta_model, sk.adapter)
        # the whole model's parameter names, before building the shard replaces other ranks' parts
        self.all_param_names = [n for n, _ in
                                sk.meta_model.named_parameters(remove_duplicate=False)]
        loaded = build_shard(sk, plan, rank, self, device)
        self.hf: Any = loaded.hf_model
        journal = None if state_dir is None else Journal(Path(state_dir) / f"rank-{rank}")
        self.local = LocalExecutor(loaded, rank=rank, store=SaveStore(journal=journal),
                                   adapter=sk.adapter)
        self.config = self.hf.config
        self.specs = build_specs(self.hf, self.adapter)
        self.modules = dict(self.hf.named_modules())
        start, stop = plan.ranges[rank]
        layers = self.adapter.layers
        self.block_paths = [f"{layers}.{i}" for i in range(plan.n_layers)]
        attn = self.adapter.attention
        self.attention_paths = ({f"{layers}.{i}.{attn}": i for i in range(start, stop)}
                                if attn else {})
        self._held: tuple[int, Transaction, OrderedWrites, str] | None = None
        self._on_commit: Callable[[], None] | None = None
        self.last_exception: BaseException | None = None
        self._seq = 0
        self._pass = 0
        self._phase = 0
        self._mode = "run"
        self._txn: str | None = None
        self._received: list[torch.Tensor] = []
        self._sent: list[torch.Tensor] = []
        self._logits: list[torch.Tensor] = []
        #: generation: the decode step being run (rank 0 records it, the others receive it)
        self._step: Step | None = None
        self._inbox: torch.Tensor | None = None  # the hidden state that came with the step
        self.hf.register_forward_pre_hook(self._begin_pass)
        self.hf.register_forward_hook(self._end_pass)

    # ----------------------------------------------------------------- pipeline callbacks
    def order_key(self, run: int, n: int) -> OrderKey:
        return (run, self._pass, self._phase, self.rank if self._phase == 0 else -self.rank, n)

    def _begin_pass(self, module: Any, args: Any) -> None:
        self._pass += 1

    def _end_pass(self, module: Any, args: Any, output: Any) -> None:
        if self.rank != self.last:
            return
        logits = getattr(output, "logits", None)  # None: a base model without a head
        if logits is None:
            return
        if self._mode == "generate":  # only rank 0 runs the decode loop
            self.channel.send(0, keys.logits(self._seq, self._pass, 0), logits, stream="logits")
        elif self._mode == "run":
            self._logits.append(logits)

    def receive_activation(self, like: torch.Tensor) -> torch.Tensor:
        if self._mode == "generate":  # received with the step, before this forward began
            hidden, self._inbox = self._inbox, None
            assert hidden is not None, "a decode step without its hidden state"
            return hidden.to(self.device, dtype=like.dtype)
        key = keys.act(self._seq, self._pass, self.rank - 1, self.rank)
        hidden = self.channel.recv(self.rank - 1, key).to(dtype=like.dtype)
        if torch.is_grad_enabled():
            hidden.requires_grad_(True)
            self._received.append(hidden)
            return hidden.clone()
        return hidden

    def send_activation(self, hidden: torch.Tensor) -> None:
        if self._mode == "generate":  # the step's arguments travel with its hidden state
            self.channel.send_object(
                self.rank + 1, keys.step(self._seq, self._pass, self.rank, self.rank + 1),
                {"step": self._step, "hidden": hidden.detach().cpu()}, stream="act")
            return
        key = keys.act(self._seq, self._pass, self.rank, self.rank + 1)
        self.channel.send(self.rank + 1, key, hidden, stream="act")
        if torch.is_grad_enabled() and hidden.requires_grad:
            self._sent.append(hidden)

    def logits_for(self, hidden: torch.Tensor, vocab: int) -> torch.Tensor:
        if self._mode == "generate" and self.rank == 0:
            key = keys.logits(self._seq, self._pass, self.rank)
            return self.channel.recv(self.last, key).to(dtype=hidden.dtype)
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], vocab)

    # ----------------------------------------------------------------- commands
    def execute(self, cmd: Command, **local: Any) -> dict[str, Any]:
        """Run ``cmd`` on this rank and describe the outcome as an envelope (never raises)."""
        if cmd.seq > 1:
            self.channel.drain(cmd.seq - 1)
        self._seq = cmd.seq
        self._txn = cmd.txn
        self._pass = 0
        self._phase = 0
        self._received, self._sent, self._logits = [], [], []
        self.channel.command = cmd.seq
        self.last_exception = None
        handler = getattr(self, f"op_{cmd.op}", None)
        try:
            if handler is None:
                raise UsageError(f"unknown distributed command {cmd.op!r}")
            with interruptible(self.control.abort_event):  # stops user code stuck in a loop
                value = handler(**cmd.kwargs, **local)
        except BaseException as exc:  # reported to rank 0, which raises it for the client
            self.last_exception = exc
            aborted = self.control.abort_event.is_set() and \
                self.control.abort_origin not in (None, self.rank)
            if not aborted:
                self.control.abort(cmd.seq, type(exc).__name__)
            self.channel.flush(aborted=True)
            if not isinstance(exc, Exception):
                raise
            return error_envelope(exc, aborted=aborted or isinstance(exc, Aborted),
                                  rank=self.rank)
        finally:
            self._received, self._sent, self._logits = [], [], []
            self._step, self._inbox = None, None
            self._mode = "run"
        try:
            self.channel.flush()
        except (Aborted, Cancelled) as exc:
            return error_envelope(exc, aborted=isinstance(exc, Aborted), rank=self.rank)
        return {"ok": True, "value": value}

    def settle(self, seq: int, commit: bool) -> None:
        held, self._held = self._held, None
        on_commit, self._on_commit = self._on_commit, None
        if held is None or held[0] != seq:
            return
        txn = held[1]
        if not commit:
            txn.rollback()
            return
        txn.commit()
        if on_commit is not None:
            on_commit()

    def _hold(self, txn: Transaction, writes: OrderedWrites, save: str) -> None:
        self._held = (self._seq, txn, writes, save)

    def _owned_plan(self, forward: dict[str, list[ProbeFn]],
                    backward: dict[str, list[ProbeFn]]) -> ProbePlan:
        def mine(probes: dict[str, list[ProbeFn]]) -> dict[str, list[ProbeFn]]:
            return {n: f for n, f in probes.items()
                    if self.ownership.point_owner(self.full_specs[n]) == self.rank}
        # a dictionary's points become one probe at its base point, which a rank owns
        plan = self.local.derived.expand(ProbePlan(forward, backward))
        return ProbePlan(mine(plan.forward), mine(plan.backward))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, plan: ProbePlan, writes: Any,
                 example_ids: torch.Tensor | None, *, grad: bool, head: bool = True) -> Any:
        ids, mask = ids.to(self.device), mask.to(self.device)
        if example_ids is not None:
            example_ids = example_ids.to(self.device)
        info = RunInfo(writes=writes, tokens=ids, attention_mask=mask,
                       example_ids=example_ids, model=self.local.facade, rank=self.rank,
                       cancel=self.control.abort_event)
        attachment = self._attachment(plan, info)
        needed = head or grad or self._mode == "generate" or self.local.reads_head(plan)
        extra = head_kwargs(self.hf, needed=needed)
        if self._mode != "generate" and _accepts_use_cache(self.hf):
            # one pass builds no KV cache: every rank would build (and fill) its own for nothing
            extra["use_cache"] = False
        with attachment.attached(), torch.set_grad_enabled(grad):
            return self.hf(input_ids=ids, attention_mask=mask, **extra)

    def _attachment(self, plan: ProbePlan, info: RunInfo) -> Attachment:
        return Attachment(hf_model=self.hf, modules=self.modules, specs=self.specs, plan=plan,
                          run=lambda: info, cancel=self.control.abort_event,
                          block_paths=self.block_paths, attention_paths=self.attention_paths,
                          attention_method=self.adapter.attention_method)

    def _begin(self, save: str) -> tuple[Transaction, OrderedWrites]:
        txn = self.local.store.begin(tag=self._txn)
        return txn, OrderedWrites(txn.writes(save), self)

    def op_run(self, ids: torch.Tensor, mask: torch.Tensor, forward: dict, backward_probes: dict,
               save: str, backward: Any, return_logits: bool, micro_batches: int,
               return_loss: bool = False) -> Any:
        plan = self._owned_plan(forward, backward_probes)
        grad = bool(backward)
        head = grad or return_logits or return_loss
        txn, writes = self._begin(save)
        try:
            if grad:
                self.hf.zero_grad(set_to_none=True)
            n = 1 if grad else max(1, min(micro_batches, ids.shape[0]))
            # plain runs number their rows per save context, on every rank alike (as locally)
            start = writes.examples_seen
            example_ids = torch.arange(start, start + ids.shape[0])
            writes.examples += ids.shape[0]
            for chunk_ids, chunk_mask, chunk_examples in zip(
                    ids.chunk(n), mask.chunk(n), example_ids.chunk(n), strict=True):
                self._forward(chunk_ids, chunk_mask, plan, writes, chunk_examples, grad=grad,
                              head=head)
            value: dict[str, Any] = {}
            if self.rank == self.last and not head:
                value["loss"] = None  # nobody asked for logits or loss: none computed
            elif self.rank == self.last and not self._logits:  # a base model: no logits
                if grad:  # the facade refuses this first; a clear error if a caller did not
                    raise UsageError(no_head_message(self.local.name, "backward"))
                value["loss"] = None  # rank 0 asks no logits of a headless model
            elif self.rank == self.last:
                logits = self._logits[0] if len(self._logits) == 1 else torch.cat(self._logits)
                if grad:  # the loss only where asked for or already computed by the backward
                    outputs = self._backward_last(backward, logits, ids, mask)
                    loss = outputs.loss if return_loss else outputs.computed_loss()
                else:
                    loss = next_token_loss(logits, ids.to(logits.device), mask) \
                        if self.local.causal and return_loss else None
                value["loss"] = None if loss is None else float(loss.detach())
                if return_logits:
                    self.channel.send(0, keys.final_logits(self._seq), logits.detach())
            elif grad:
                self._backward_inner()
            if grad:
                self._send_input_grad()
                self._sum_tied_grads()
            writes.runs += 1
        except BaseException:
            txn.rollback()
            raise
        self._hold(txn, writes, save)
        return value

    def _backward_last(self, backward: Any, logits: torch.Tensor, ids: torch.Tensor,
                       mask: torch.Tensor) -> Outputs:
        self._phase = 1
        with torch.enable_grad():
            loss = (lambda: next_token_loss(logits, ids.to(logits.device), mask)) \
                if self.local.causal else None
            outputs = Outputs(logits, loss, ids.to(logits.device), mask.to(logits.device))
            backward_objective(backward, outputs).backward()
        return outputs

    def _backward_inner(self) -> None:
        self._phase = 1
        grads = []
        for i, sent in enumerate(self._sent):
            key = keys.grad(self._seq, i, self.rank + 1, self.rank)
            grads.append(self.channel.recv(self.rank + 1, key).to(dtype=sent.dtype))
        with torch.enable_grad():
            torch.autograd.backward(self._sent, grads)

    def _send_input_grad(self) -> None:
        if self.rank == 0:
            return
        for i, received in enumerate(self._received):
            grad = received.grad if received.grad is not None else torch.zeros_like(received)
            self.channel.send(self.rank - 1, keys.grad(self._seq, i, self.rank, self.rank - 1),
                              grad)

    def _sum_tied_grads(self) -> None:
        """A tied embedding/unembedding lives on rank 0 and the last rank: add both gradients."""
        if not getattr(self.config, "tie_word_embeddings", False):
            return
        tied = dict(getattr(self.hf, "_tied_weights_keys", None) or {})
        params = dict(self.hf.named_parameters())
        for target, source in sorted(tied.items()):
            owners = (self.ownership.param_owner(source), self.ownership.param_owner(target))
            if owners[0] == owners[1] or self.rank not in owners:
                continue
            mine = params[source if self.rank == owners[0] else target]
            peer = owners[1] if self.rank == owners[0] else owners[0]
            grad = mine.grad if mine.grad is not None else torch.zeros_like(mine)
            self.channel.send(peer, keys.tied(self._seq, target, self.rank), grad)
            other = self.channel.recv(peer, keys.tied(self._seq, target, peer))
            first, second = (grad, other) if self.rank == owners[0] else (other, grad)
            mine.grad = first + second

    def op_generate(self, ids: torch.Tensor, mask: torch.Tensor, forward: dict, save: str,
                    options: dict, seed: int) -> torch.Tensor | None:
        """Rank 0 runs ``generate``; every other rank runs its shard once per decode step."""
        plan = self._owned_plan(forward, {})
        txn, writes = self._begin(save)
        self._mode = "generate"
        out = None
        try:
            with torch.random.fork_rng(devices=[]):
                if self.device.type == "cpu":  # torch.manual_seed also seeds every
                    torch.default_generator.manual_seed(seed)  # accelerator API (~1 ms)
                else:
                    torch.manual_seed(seed)
                if self.rank == 0:
                    out = self._drive_generation(plan, writes, ids, mask, options)
                else:
                    self._follow_generation(plan, writes, ids, mask)
            writes.runs += 1
        except BaseException:
            txn.rollback()
            raise
        self._hold(txn, writes, save)
        return None if out is None else out.cpu()

    def _drive_generation(self, plan: ProbePlan, writes: Any, ids: torch.Tensor,
                          mask: torch.Tensor, options: dict) -> torch.Tensor:
        recorder = StepRecorder()

        def record(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
            recorder(module, args, kwargs)
            self._step = recorder.step

        handle = self.hf.register_forward_pre_hook(record, with_kwargs=True)
        try:
            out = self.local.generate_with(
                plan, writes, ids, mask, options, self.control.abort_event,
                attachment_for=lambda info: self._attachment(plan, info))
        finally:
            handle.remove()
        # the followers wait for a next step: there is none
        self.channel.send_object(1, keys.step(self._seq, self._pass + 1, 0, 1), None,
                                 stream="act")
        return out

    def _follow_generation(self, plan: ProbePlan, writes: Any, ids: torch.Tensor,
                           mask: torch.Tensor) -> None:
        """Run this shard for each step the previous rank passes on, until it says stop.

        Probes see each step's tokens and mask as they do in a local ``generate``.
        """
        info = RunInfo(writes=writes, tokens=ids, attention_mask=mask, example_ids=None,
                       model=self.local.facade, rank=self.rank, cancel=self.control.abort_event)
        follower = Follower(self.device)
        attachment = self._attachment(plan, info)
        with attachment.attached(), torch.no_grad():
            while True:
                key = keys.step(self._seq, self._pass + 1, self.rank - 1, self.rank)
                message = self.channel.recv_object(self.rank - 1, key)
                if message is None:
                    if self.rank != self.last:
                        self.channel.send_object(
                            self.rank + 1,
                            keys.step(self._seq, self._pass + 1, self.rank, self.rank + 1),
                            None, stream="act")
                    return
                self._step, self._inbox = message["step"], message["hidden"]
                kwargs = follower.kwargs(message["step"])
                if isinstance(kwargs.get("input_ids"), torch.Tensor):
                    info.tokens = kwargs["input_ids"]
                if isinstance(kwargs.get("attention_mask"), torch.Tensor):
                    info.attention_mask = kwargs["attention_mask"]
                follower.returned(self.hf(**kwargs))

    def op_dataset(self, dataset: Any, batch_size: int, limit: int | None, forward: dict,
                   save: str, micro_batches: int, progress: Any = None,
                   cancel: Any = None, checkpoint_every: int | None = None,
                   resume: bool = False, export: dict[str, Any] | None = None
                   ) -> dict[str, Any]:
        from cloche.runtime.datasets import Resumable, iterate, with_export_probes
        from cloche.runtime.export import batches_per_shard
        from cloche.sharding.checkpoints import AgreedCheckpoints

        exporter = self._dataset_exporter(export, dataset, batch_size, limit, micro_batches)
        run = ProbePlan(forward)
        plan = self._owned_plan(
            (run if exporter is None else with_export_probes(run, exporter)).forward, {})
        txn, writes = self._begin(save)
        self._mode = "dataset"
        totals = {"examples": 0, "tokens": 0}
        watch = cancel if cancel is not None else self.control.abort_event
        stop = len(dataset) if limit is None else min(limit, len(dataset))
        ok = False
        try:
            agreed = AgreedCheckpoints(self.local.checkpoints, self.control, self._seq,
                                       self.rank, self.plan.world_size)
            aligned = None
            if export is not None:  # every rank, exporting or not, checkpoints at shard ends
                per_shard = batches_per_shard(export["shard_tokens"], batch_size,
                                              dataset.seq_len)
                aligned = lambda g: g % per_shard == 0  # noqa: E731
            resumable = Resumable(agreed, _DatasetRun(save, checkpoint_every, resume,
                                                      batch_size, limit, micro_batches),
                                  dataset, txn.writes(save), watch, aligned)
            start = resumable.start(totals)
            if export is not None and not forward and not resumable.active:
                # nothing but the export: skip the shards that every exporting rank wrote
                start = agreed.least("export", stop if exporter is None
                                     else exporter.resume_from())
            if start:  # the passes and saves before the checkpoint, as an unbroken run has them
                self._pass = (start // batch_size) * max(1, min(micro_batches, batch_size))
                writes.restored(sum(len(v) for v in txn.writes(save).saves.values()))

            def after(batch: Any) -> None:
                if exporter is not None:
                    exporter.end_batch(batch)
                end = int(batch.example_ids[-1]) + 1
                resumable.after_batch(end, totals, end >= stop)

            for batch in iterate(dataset, batch_size, limit, progress, totals, watch,
                                 start=start, after=after):
                if self.control.abort_event.is_set():
                    raise Cancelled("the dataset run was cancelled")
                if exporter is not None:
                    exporter.begin_batch(batch)
                n = max(1, min(micro_batches, batch.tokens.shape[0]))
                for ids, mask, ex in zip(batch.tokens.chunk(n), batch.attention_mask.chunk(n),
                                         batch.example_ids.chunk(n), strict=True):
                    self._forward(ids, mask, plan, writes, ex, grad=False, head=False)
                writes.runs += 1
            ok = True
        except BaseException:
            txn.rollback()
            raise
        finally:
            exported = exporter.close(complete=ok) if exporter is not None else None
        self._hold(txn, writes, save)
        self._on_commit = resumable.finished  # the checkpoint is spent once every rank commits
        return {**totals, "export": exported}

    def _dataset_exporter(self, export: dict[str, Any] | None, dataset: Any, batch_size: int,
                          limit: int | None, micro_batches: int) -> Any:
        """This rank's exporter: the export points it owns, in ``<dir>/rank-<r>`` (or None)."""
        if export is None:
            return None
        from cloche.runtime.derived import is_derived
        from cloche.runtime.export import Exporter

        def owner(point: str) -> int:
            base = self.local.derived.base_of(point) if is_derived(point) else point
            return self.ownership.point_owner(self.full_specs[base])

        points = [p for p in export["points"] if owner(p) == self.rank]
        if not points:
            return None
        return Exporter(str(Path(export["dir"]) / f"rank-{self.rank}"), points, export["dtype"],
                        export["shard_tokens"], dataset, batch_size, limit, micro_batches)

    def op_attach_dictionary(self, name: str, point: str, out_point: str | None,
                             build: Callable[..., Any], config: dict | None,
                             weights: dict | None, path: str | None) -> dict[str, Any]:
        """Every rank learns the dictionary's points; the one that runs ``point`` keeps it."""
        owner = self.ownership.point_owner(self.full_specs[point])
        module = build(config, weights, path)
        derived = make_derived(name, point, module, self.full_specs, (), {}, rank=owner,
                               device=self.device, owned=owner == self.rank,
                               out_point=out_point)
        self.local.derived.attach(derived)
        return dict(derived.summary)

    def op_detach_dictionary(self, name: str) -> None:
        self.local.derived.detach(name)

    def op_shapes(self) -> dict[str, tuple]:
        seen: dict[str, tuple] = {}
        names = [n for n in self.full_specs
                 if self.ownership.point_owner(self.full_specs[n]) == self.rank]
        ids = probe_ids(self.local.describe().d_vocab)
        plan = ProbePlan(forward={n: [shape_reader(seen)] for n in names})
        txn = self.local.store.begin()
        try:
            self._forward(ids, torch.ones_like(ids), plan, txn.writes(SHAPES_CONTEXT), None,
                          grad=False)
        finally:
            txn.rollback()
        return seen

    # ----------------------------------------------------------------- save contexts
    def op_ctx(self, name: str, action: str, args: tuple = (), ranks: list[int] | None = None
               ) -> Any:
        """This rank's part of a save-context action (rank 0's executor combines the parts)."""
        if ranks is not None and self.rank not in ranks:
            return None
        store = self.local.store
        if action == "names":
            return self.local.context_names()
        if action == "summary":
            ctx = store.find(name)
            if ctx is None:
                return None
            return {"keys": {k: len(v) for k, v in ctx.entries.items()},
                    "reducers": sorted(ctx.reducers), "num_runs": ctx.num_runs,
                    "nbytes": ctx.nbytes, "has_state": bool(ctx.state)}
        if action == "entries":
            (key,) = args
            values = entries(store, name, key)
            ctx = store.find(name)
            order = list(ctx.order.get(key, [])) if ctx is not None else []
            if len(order) != len(values):  # restored from a file: keep the stored order
                order = [(0, 0, 0, self.rank, i) for i in range(len(values))]
            return {"order": order, "values": [v.cpu() for v in values]}
        if action == "fetch":
            joined = context_action(store, name, "fetch", args)
            return [v.cpu() for v in joined] if isinstance(joined, list) else joined.cpu()
        if action == "fetch_many":
            return {key: [v.cpu() for v in joined] if isinstance(joined, list) else joined.cpu()
                    for key, joined in context_action(store, name, "fetch_many", args).items()}
        if action == "state":
            return context_action(store, name, "state")
        if action == "reducers":
            return {n: r.state_dict() for n, r in context_action(store, name, "reducers").items()}
        if action == "clear":
            context_action(store, name, "clear")
            return None
        if action == "put":
            (ctx_obj,) = args
            store.put(ctx_obj)
            return None
        raise UsageError(f"unknown save-context action {action!r}")

    LIGHT_ACTIONS = ("names", "summary", "entries", "fetch", "fetch_many", "state", "reducers")

    def light(self, op: str, kwargs: dict[str, Any]) -> Any:
        """A read-only request on committed data, served beside a running command."""
        if op == "ctx" and kwargs.get("action") in self.LIGHT_ACTIONS:
            return self.op_ctx(**kwargs)
        if op == "param":
            return self.op_param(**kwargs)
        raise UsageError(f"{op} {kwargs.get('action', '')} is not a light request")

    # ----------------------------------------------------------------- weights and code
    def op_param(self, name: str, grad: bool, target: int, index: Any = None) -> Any:
        if self.rank != target:
            return None
        return self.local.param(name, grad, index).cpu().clone()

    def op_call(self, fn: Callable[..., Any], args: tuple, kwargs: dict, targets: list[int]
                ) -> Any:
        if self.rank not in targets:
            return None
        if self.rank == 0:  # where the caller is (or a server, which silences its requests)
            return run_user_function(fn, self.local.facade, args, kwargs)
        with silenced():  # a worker rank's console is nobody's: no bars from user code there
            return run_user_function(fn, self.local.facade, args, kwargs)

    def op_ping(self) -> int:
        return self.rank

    # ----------------------------------------------------------------- recovery
    def op_undo_after(self, committed: str | None) -> list[str]:
        """Take back this rank's commits of transactions rank 0 never recorded as whole."""
        return self.local.store.undo_after(committed)

    def op_quota(self, prefix: str, max_bytes: int | None, label: str) -> None:
        """The same cap on every rank's part (each rank holds its own contexts' bytes)."""
        self.local.store.set_quota(prefix, max_bytes, label)

    def op_shutdown(self) -> None:
        return None
