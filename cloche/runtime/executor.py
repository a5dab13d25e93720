"""The local executor: a Hugging Face model in this process, with probe points and save contexts.

``cloche.load(path)`` wraps one in :class:`cloche.Model`; the server serves one; every rank of
a sharded model holds one for its shard. It executes request records
(``cloche.api.requests``) that the facade has already validated: attach the probes of one run,
run forward (and backward), always detach, and commit the run's writes to the save contexts
only when it succeeded.
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch
from torch import nn

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
from cloche.api.inputs import next_token_loss
from cloche.api.model import Model
from cloche.api.results import Outputs
from cloche.errors import UsageError
from cloche.model.discover import discover
from cloche.model.families import Adapter
from cloche.model.hub import display_name
from cloche.model.info import ModelInfo, describe, no_head_message
from cloche.model.loader import Loaded
from cloche.model.points import PointSpec, ProbePoint, build_specs
from cloche.model.rebase import adapter_for_model
from cloche.model.weights import WeightCatalog, expert_count, head_shape, read_weight
from cloche.probes.actions import context_action
from cloche.probes.checkpoint import Checkpoints
from cloche.probes.context import RunInfo
from cloche.probes.refs import apply_ops
from cloche.probes.store import SaveStore, Transaction
from cloche.runtime.datasets import Resumable, as_dataset, iterate, open_export, with_export_probes
from cloche.runtime.derived import DerivedPoints, is_derived, make_derived
from cloche.runtime.head import head_kwargs
from cloche.runtime.hooks import Attachment, ProbePlan
from cloche.runtime.interrupt import interruptible
from cloche.runtime.shapes import probe_ids, shape_reader
from cloche.runtime.usercode import backward_objective, run_user_function

__all__ = ["LocalExecutor"]

T = TypeVar("T")

#: the save context the shape-discovery pass writes to (always rolled back, never listed)
SHAPES_CONTEXT = "__shapes__"


class LocalExecutor:
    """Executes requests on a model held by this process (one rank of a sharded one, or all)."""

    def __init__(self, loaded: Loaded, *, store: SaveStore | None = None, rank: int = 0,
                 name: str | None = None, adapter: Adapter | None = None) -> None:
        """``adapter``: the model's structure when the caller knows it (a shard, whose stubs
        leave nothing for discovery to run); by default its family's table or discovery."""
        self.hf_model: nn.Module = loaded.hf_model
        self._tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.name = name or display_name(loaded.path)
        self._config = self.hf_model.config
        self.adapter: Adapter | None = adapter or adapter_for_model(self.hf_model)
        if self.adapter is None:
            self.adapter = discover(self.hf_model)
        if rank == 0 and (self.adapter is None or self.adapter.discovered):
            _warn_unknown_family(self.name, getattr(self._config, "model_type", None),
                                 self.adapter)
        #: False for a base model saved without its head (no logits, no unembed)
        self.lm_head = loaded.lm_head
        self.store = store if store is not None else SaveStore()
        self.rank = rank
        self.specs: dict[str, PointSpec] = build_specs(self.hf_model, self.adapter)
        self._shapes: dict[str, tuple[str | int, ...] | None] | None = None
        #: attached dictionaries, whose features/reconstruction/error are derived points
        self.derived = DerivedPoints()
        self._info: ModelInfo | None = None
        self._facade: Model | None = None
        self._params = dict(self.hf_model.named_parameters(remove_duplicate=False))
        self._weights = WeightCatalog(self.adapter, self.n_layers, list(self._params),
                                      expert_count(self._config))
        self._modules = dict(self.hf_model.named_modules())
        # one forward at a time: hooks and the attention switch are per model, not per thread
        self._exec_lock = threading.RLock()
        if self.adapter is not None:
            layers = self.adapter.layers
            self._block_paths = [f"{layers}.{i}" for i in range(self.n_layers)]
            attn = self.adapter.attention
            self._attention_paths = ({f"{layers}.{i}.{attn}": i for i in range(self.n_layers)}
                                     if attn else {})
        else:
            self._block_paths, self._attention_paths = [], {}
        self._attention_method = self.adapter.attention_method if self.adapter else None
        self._checkpoints: Checkpoints | None = None

    # ----------------------------------------------------------------- description
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def config(self) -> Any:
        return self._config

    @property
    def n_layers(self) -> int:
        return int(getattr(self._config, "num_hidden_layers", 0) or 0)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    def describe(self) -> ModelInfo:
        if self._info is None:
            self._info = describe(self._config, self.adapter, name=self.name,
                                  device=self.device,
                                  point_names=[*self.specs, *self.derived.names()],
                                  rank=self.rank, lm_head=self.lm_head)
        return self._info

    @property
    def causal(self) -> bool:
        return self.describe().causal

    @property
    def facade(self) -> Model:
        """This executor behind the model API: what probes see as ``ctx.model`` and shipped
        functions receive (on a sharded model's rank: that rank's shard)."""
        if self._facade is None:
            self._facade = Model(self)
        return self._facade

    def probe_points(self) -> list[ProbePoint]:
        shapes = self._discover_shapes()
        return [*(ProbePoint(s.name, s.kind, s.layer, shapes.get(s.name),
                             s.site.module if s.site else None) for s in self.specs.values()),
                *self.derived.probe_points(shapes, lambda p: self.specs[p].layer)]

    def _discover_shapes(self) -> dict[str, tuple[str | int, ...] | None]:
        """Run one tiny forward with a reader at every point and record symbolic shapes."""
        if self._shapes is not None:
            return self._shapes
        seen: dict[str, tuple[str | int, ...]] = {}
        ids = probe_ids(self.describe().d_vocab)
        plan = ProbePlan(forward={name: [shape_reader(seen)] for name in self.specs})
        txn = self.store.begin()
        try:
            with self._exec_lock:
                self.forward(ids, torch.ones_like(ids), plan, txn.writes(SHAPES_CONTEXT), None,
                             None, grad=False)
        finally:
            txn.rollback()
        self._shapes = {name: seen.get(name) for name in self.specs}
        return self._shapes

    # ----------------------------------------------------------------- the seam
    def execute(self, request: rq.Request[T], *, cancel: CancelEvent | None = None,
                on_event: EventSink | None = None) -> T:
        if cancel is None or not request.is_heavy:
            return dispatch(self._HANDLERS, self, request, cancel, on_event)
        with interruptible(cancel):  # a cancel also stops a probe stuck in a Python loop
            return dispatch(self._HANDLERS, self, request, cancel, on_event)

    def submit(self, request: rq.Request[T], *, on_event: EventSink | None = None
               ) -> RequestFuture[T]:
        return submit_in_thread(self, request, on_event)

    def close(self) -> None:
        """Nothing to release: the model lives as long as this object."""

    # ----------------------------------------------------------------- running
    def forward(self, ids: torch.Tensor, mask: torch.Tensor, plan: ProbePlan, writes: Any,
                example_ids: torch.Tensor | None, cancel: Any, *, grad: bool,
                head: bool = True) -> Any:
        """One forward pass of ``hf_model`` with ``plan`` attached (and detached after);
        ``head=False``: nobody reads the logits, so the unembedding may skip most positions."""
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        plan = self.derived.expand(plan)
        info = RunInfo(writes=writes, tokens=ids, attention_mask=mask, example_ids=example_ids,
                       model=self.facade, rank=self.rank, cancel=cancel)
        attachment = Attachment(self.hf_model, self._modules, self.specs, plan, lambda: info,
                                cancel, self._block_paths, self._attention_paths,
                                self._attention_method)
        extra = head_kwargs(self.hf_model, needed=head or grad or self.reads_head(plan))
        with attachment.attached(), torch.set_grad_enabled(grad):
            return self.hf_model(input_ids=ids, attention_mask=mask, **extra)

    def reads_head(self, plan: ProbePlan) -> bool:
        """Whether a probe of ``plan`` sits at the unembedding's output (or where it cannot be
        told): then every position's logits are computed, as in the plain forward."""
        head = {"", self.adapter.logits} if self.adapter is not None else {""}
        for name in plan.points():
            spec = self.specs.get(name)
            if spec is None or (spec.site is None and spec.attention is None):
                return True
            if spec.site is not None and spec.site.module in head:
                return True
        return False

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[Transaction]:
        txn = self.store.begin()
        try:
            with self._exec_lock:
                yield txn
        except BaseException:
            txn.rollback()
            raise
        txn.commit()

    def _run(self, req: rq.Run, cancel: CancelEvent | None, on_event: Any) -> rq.RunOutput:
        plan = ProbePlan(req.forward, req.backward_probes)
        with self._transaction() as txn:
            return self._run_ids(req.ids, req.mask, plan, txn, req.save, backward=req.backward,
                                 return_logits=req.return_logits,
                                 want_loss=req.return_loss, cancel=cancel,
                                 micro_batches=req.micro_batches)

    def _run_ids(self, ids: torch.Tensor, mask: torch.Tensor, plan: ProbePlan,
                 txn: Transaction, save: str, *, backward: Any, return_logits: bool,
                 want_loss: bool, cancel: Any, micro_batches: int = 1,
                 example_ids: torch.Tensor | None = None) -> rq.RunOutput:
        writes = txn.writes(save)
        if example_ids is None:  # plain runs number their rows per save context
            start = writes.examples_seen
            example_ids = torch.arange(start, start + ids.shape[0])
            writes.examples += ids.shape[0]
        example_ids = example_ids.to(self.device)
        grad = backward is not None
        head = grad or return_logits or want_loss
        if grad and not self.lm_head:  # the facade refuses this first; a clear error anyway
            raise UsageError(no_head_message(self.name, "backward"))
        if grad:
            self.hf_model.zero_grad(set_to_none=True)
        n = 1 if grad else max(1, min(micro_batches, ids.shape[0]))
        chunks: list[torch.Tensor] = []
        for part_ids, part_mask, part_examples in zip(ids.chunk(n), mask.chunk(n),
                                                      example_ids.chunk(n), strict=True):
            out = self.forward(part_ids, part_mask, plan, writes, part_examples, cancel,
                               grad=grad, head=head)
            if head and getattr(out, "logits", None) is not None:  # a base model has none
                chunks.append(out.logits)
        if not chunks:
            writes.runs += 1
            return rq.RunOutput(logits=None, loss=None)
        logits = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        loss = None
        if grad:
            with torch.enable_grad():
                ids_d, mask_d = ids.to(logits.device), mask.to(logits.device)
                outputs = Outputs(logits, (lambda: next_token_loss(logits, ids_d, mask_d))
                                  if self.causal else None, ids_d, mask_d)
                backward_objective(backward, outputs).backward()
            # the loss travels back when asked for, or when the backward already computed it
            loss = outputs.loss if want_loss else outputs.computed_loss()
        elif want_loss and self.causal:
            loss = next_token_loss(logits, ids.to(logits.device), mask.to(logits.device))
        writes.runs += 1
        return rq.RunOutput(logits=logits.detach() if return_logits else None,
                            loss=None if loss is None else float(loss.detach()))

    def _generate(self, req: rq.Generate, cancel: CancelEvent | None, on_event: Any
                  ) -> torch.Tensor:
        plan = ProbePlan(req.forward)
        with self._transaction() as txn, torch.random.fork_rng(devices=[]):
            torch.manual_seed(req.seed)
            writes = txn.writes(req.save)
            out = self.generate_with(plan, writes, req.ids, req.mask, req.options, cancel)
            writes.runs += 1
        return out.cpu()

    def generate_with(self, plan: ProbePlan, writes: Any, ids: torch.Tensor, mask: torch.Tensor,
                      options: Mapping[str, Any], cancel: Any,
                      attachment_for: Callable[[RunInfo], Attachment] | None = None
                      ) -> torch.Tensor:
        """Hugging Face ``generate`` with ``plan`` attached; probes see each step's tokens."""
        info = RunInfo(writes=writes, tokens=ids, attention_mask=mask, example_ids=None,
                       model=self.facade, rank=self.rank, cancel=cancel)
        plan = self.derived.expand(plan)

        def track(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
            if isinstance(kwargs.get("input_ids"), torch.Tensor):
                info.tokens = kwargs["input_ids"]
            if isinstance(kwargs.get("attention_mask"), torch.Tensor):
                info.attention_mask = kwargs["attention_mask"]

        attachment = (attachment_for(info) if attachment_for is not None else
                      Attachment(self.hf_model, self._modules, self.specs, plan, lambda: info,
                                 cancel, self._block_paths, self._attention_paths,
                                self._attention_method))
        handle = self.hf_model.register_forward_pre_hook(track, with_kwargs=True)
        hf_model: Any = self.hf_model  # a transformers model: nn.Module has no generate()
        try:
            with attachment.attached(), torch.no_grad():
                return hf_model.generate(input_ids=ids.to(self.device),
                                         attention_mask=mask.to(self.device), **options)
        finally:
            handle.remove()

    def _run_dataset(self, req: rq.RunDataset, cancel: CancelEvent | None,
                     on_event: EventSink | None) -> dict[str, Any]:
        ds = as_dataset(req.dataset, self._tokenizer, cancel)
        plan = ProbePlan(req.forward)
        exporter = open_export(req, ds)
        if exporter is not None:
            plan = with_export_probes(plan, exporter)
        totals = {"examples": 0, "tokens": 0}
        stop = len(ds) if req.limit is None else min(req.limit, len(ds))
        ok = False
        try:
            with self._transaction() as txn:
                resumable = Resumable(self.checkpoints, req, ds, txn.writes(req.save), cancel,
                                      exporter.aligned if exporter is not None else None)
                start = resumable.start(totals)
                if exporter is not None and not req.forward and not resumable.active:
                    start = exporter.resume_from()  # nothing but the export: skip its shards

                def after(batch: Any) -> None:
                    if exporter is not None:
                        exporter.end_batch(batch)
                    end = int(batch.example_ids[-1]) + 1
                    resumable.after_batch(end, totals, end >= stop)

                for batch in iterate(ds, req.batch_size, req.limit, on_event, totals, cancel,
                                     start=start, after=after):
                    if exporter is not None:
                        exporter.begin_batch(batch)
                    self._run_ids(batch.tokens, batch.attention_mask, plan, txn, req.save,
                                  backward=None, return_logits=False, want_loss=False,
                                  cancel=cancel, micro_batches=req.micro_batches,
                                  example_ids=batch.example_ids)
            ok = True
        finally:
            export = exporter.close(complete=ok) if exporter is not None else None
        resumable.finished()
        summary = dataset_summary(totals, ds, self.store, req.save)
        if export is not None:
            summary["export"] = export
        return summary

    @property
    def checkpoints(self) -> Checkpoints:
        """Where unfinished dataset runs keep their checkpoints (the state dir, or memory)."""
        if self._checkpoints is None:
            journal = self.store.journal
            self._checkpoints = Checkpoints(journal.root / "runs" if journal else None)
        return self._checkpoints

    def _call(self, req: rq.Call, cancel: CancelEvent | None, on_event: Any) -> Any:
        if req.rank not in (None, 0, "all"):
            raise UsageError(f"this model is not sharded: rank must be None, 0 or 'all', not"
                             f" {req.rank!r}")
        value = run_user_function(req.fn, self.facade, req.args, req.kwargs)
        return {0: value} if req.rank == "all" else value

    # ----------------------------------------------------------------- save contexts & weights
    def _context(self, req: rq.Context, cancel: Any, on_event: Any) -> Any:
        return context_action(self.store, req.name, req.action, req.args)

    def context_names(self) -> list[str]:
        return [n for n in self.store.names() if n != SHAPES_CONTEXT]

    def param(self, name: str, grad: bool = False, index: list[Any] | None = None
              ) -> torch.Tensor:
        """A weight in its canonical layout; ``index`` (encoded index items, see
        ``Param``) cuts a part of it here, so only that part is copied. An attached
        dictionary's weights are ``dict:<name>:W_enc`` etc."""
        if is_derived(name):
            if grad:
                raise UsageError(f"dictionary weights have no gradients: {name!r}")
            weight = self.derived.weight(name)
            return weight.clone() if index is None else apply_ops(weight, [["index",
                                                                             list(index)]]).clone()
        raw, rule = self._weights.resolve(name)
        tensor = read_weight(self._params[raw], rule, head_shape(self._config), grad=grad,
                             name=name)
        if index is None:
            return tensor
        return apply_ops(tensor, [["index", list(index)]]).clone()

    # ----------------------------------------------------------------- dictionaries
    def _attach_dictionary(self, req: rq.AttachDictionary, cancel: Any, on_event: Any
                           ) -> dict[str, Any]:
        shapes = self._discover_shapes()
        with self._exec_lock:  # never while a forward runs
            module = req.build(req.config, req.weights, req.path)
            derived = make_derived(req.name, req.point, module, self.specs,
                                   self.describe().missing, shapes, rank=self.rank,
                                   device=self.device, out_point=req.out_point)
            self.derived.attach(derived)
            self._info = None
        return dict(derived.summary)

    def _detach_dictionary(self, req: rq.DetachDictionary, cancel: Any, on_event: Any) -> None:
        with self._exec_lock:
            self.derived.detach(req.name)
            self._info = None

    def owner(self, point: str) -> int:
        """The rank that runs ``point``: this one (the model is whole here)."""
        if is_derived(point):
            self.derived.split(point)  # an unknown one is an error, as elsewhere
        return 0

    def tokenizer_files(self) -> dict[str, bytes] | None:
        """The tokenizer as the files ``save_pretrained`` writes (for a client to load)."""
        if self._tokenizer is None:
            return None
        with tempfile.TemporaryDirectory() as directory:
            self._tokenizer.save_pretrained(directory)
            return {p.name: p.read_bytes() for p in Path(directory).iterdir() if p.is_file()}

    _HANDLERS: ClassVar[dict[type, Callable[..., Any]]] = {
        rq.Run: _run,
        rq.Generate: _generate,
        rq.RunDataset: _run_dataset,
        rq.Call: _call,
        rq.Context: _context,
        rq.Describe: lambda self, req, c, e: self.describe(),
        rq.ProbePoints: lambda self, req, c, e: self.probe_points(),
        rq.Owner: lambda self, req, c, e: self.owner(req.point),
        rq.AttachDictionary: _attach_dictionary,
        rq.DetachDictionary: _detach_dictionary,
        rq.Dictionaries: lambda self, req, c, e: self.derived.summaries(),
        rq.Param: lambda self, req, c, e: self.param(req.name, req.grad, req.index),
        rq.ParamNames: lambda self, req, c, e: self._weights.names(req.canonical),
        rq.ListContexts: lambda self, req, c, e: self.context_names(),
        rq.Config: lambda self, req, c, e: self._config.to_dict(),
        rq.TokenizerFiles: lambda self, req, c, e: self.tokenizer_files(),
        rq.Ping: lambda self, req, c, e: req.value,
        rq.ServerStatus: needs_a_server,
        rq.Quota: lambda self, req, c, e: self.store.set_quota(req.prefix, req.max_bytes,
                                                               req.label),
    }

    def __repr__(self) -> str:
        return f"LocalExecutor({self.name!r}, rank={self.rank})"


def _warn_unknown_family(name: str, model_type: str | None, adapter: Adapter | None) -> None:
    """Say loudly, at load, what a model without a cloche adapter lacks."""
    if adapter is None:
        warnings.warn(
            f"{name}: model_type {model_type!r} has no cloche adapter and its structure could not"
            " be discovered, so it has no canonical probe points or weights (layers.i.*, embed,"
            " logits, W_Q...): only module:<path>:input|output points. model.info()['missing']"
            " says what is absent and why", UserWarning, stacklevel=4)
        return
    lacking = ", ".join(f"{suffix} ({why})" for suffix, why in adapter.lacks.items())
    warnings.warn(
        f"{name}: model_type {model_type!r} has no cloche adapter; cloche discovered its"
        f" structure and verified it against output_hidden_states. Points it could not prove"
        f" are missing: {lacking or 'none'}. model.info()['missing'] lists them",
        UserWarning, stacklevel=4)


def dataset_summary(totals: dict[str, int], ds: Any, store: SaveStore, save: str
                    ) -> dict[str, Any]:
    """What ``run_dataset`` returns: totals plus the context's reduced results and state."""
    reducers = context_action(store, save, "reducers")
    return {**totals, "dataset": ds.name, "fingerprint": ds.fingerprint(),
            "reducers": {name: r.result() for name, r in reducers.items()},
            "state": context_action(store, save, "state")}


if TYPE_CHECKING:  # mypy: this class is an Executor
    def _is_executor(executor: LocalExecutor) -> Executor:
        return executor
