"""The local model: ``cloche.load(path)`` returns one; the server drives one on every rank.

Everything a notebook does goes through this small API — ``probe_points``, ``run``,
``generate``, ``run_dataset``, ``save_context``, ``param``, ``call`` — and the remote model
(``cloche.connect``) mirrors it, so the same code runs locally and against a server.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cloche.errors import ClocheError, ProbeError, UnknownProbePoint, UsageError
from cloche.model.adapters import Adapter, adapter_for
from cloche.model.loader import Loaded
from cloche.model.points import PointSpec, ProbePoint, build_specs, canonical_name
from cloche.model.weights import apply_layout, canonical_weights, head_shape
from cloche.probes.context import RunInfo
from cloche.probes.handle import SaveContextHandle
from cloche.probes.store import SaveStore, Transaction
from cloche.runtime.hooks import Attachment, ProbeFn, ProbePlan
from cloche.runtime.inputs import encode_inputs, next_token_loss

DEFAULT_CONTEXT = "default"


@dataclass
class RunResult:
    """What ``run`` returns: logits (detached), the mean next-token loss, the tokens.

    ``loss`` is computed on first access from the logits when the run did not need it (a
    cross-entropy over the whole vocabulary is not free, and most probing runs never look).
    A plain record, so it crosses the wire as data.
    """

    logits: torch.Tensor | None
    loss_value: float | None
    tokens: torch.Tensor
    attention_mask: torch.Tensor
    causal: bool = True

    @property
    def loss(self) -> float | None:
        if self.loss_value is None and self.causal and self.logits is not None:
            value = next_token_loss(self.logits, self.tokens, self.attention_mask)
            self.loss_value = None if value is None else float(value)
        return self.loss_value

    def __repr__(self) -> str:
        shape = None if self.logits is None else tuple(self.logits.shape)
        return f"RunResult(logits={shape}, loss={self.loss}, tokens={tuple(self.tokens.shape)})"


@dataclass
class Outputs:
    """What a ``backward=`` callable receives: live tensors that still carry the graph."""

    logits: torch.Tensor
    loss: torch.Tensor | None
    tokens: torch.Tensor
    attention_mask: torch.Tensor


@dataclass
class GenerateResult:
    """What ``generate`` returns."""

    text: str | None
    new_text: str | None
    tokens: torch.Tensor


def generation_options(tokenizer: Any, max_new_tokens: int, temperature: float
                       ) -> dict[str, Any]:
    """Validated keyword arguments for Hugging Face ``generate`` (greedy unless temperature > 0)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be a positive int, not {max_new_tokens!r}")
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer else None
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
        "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
    }
    if temperature > 0:
        options.update(temperature=float(temperature), top_k=0, top_p=1.0)
    return options


def generate_result(tokenizer: Any, out: torch.Tensor, prompt_len: int) -> GenerateResult:
    """Token ids from ``generate`` (prompt + continuation) as a :class:`GenerateResult`."""
    tokens = out[0].cpu() if out.shape[0] == 1 else out.cpu()
    new = tokens[..., prompt_len:]
    text = new_text = None
    if tokenizer is not None and tokens.dim() == 1:
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        new_text = tokenizer.decode(new, skip_special_tokens=True)
    return GenerateResult(text, new_text, tokens)


def _as_plan(probes: Mapping[str, Any] | None, resolve: Callable[[str], str]
             ) -> dict[str, list[ProbeFn]]:
    plan: dict[str, list[ProbeFn]] = {}
    for name, fns in (probes or {}).items():
        fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
        for fn in fns:
            if not callable(fn):
                raise UsageError(f"the probe at {name!r} is not callable: {fn!r}")
        plan.setdefault(resolve(name), []).extend(fns)
    return plan


class Model:
    """A Hugging Face model with probe points, save contexts and canonical weights."""

    def __init__(self, loaded: Loaded, *, store: SaveStore | None = None, rank: int = 0) -> None:
        self.hf_model: nn.Module = loaded.hf_model
        self.tokenizer = loaded.tokenizer
        self.path = loaded.path
        self.name = loaded.path.name
        self.config = self.hf_model.config
        self.adapter: Adapter | None = adapter_for(getattr(self.config, "model_type", None))
        self.store = store if store is not None else SaveStore()
        self.rank = rank
        self._specs: dict[str, PointSpec] = build_specs(self.hf_model, self.adapter)
        self._shapes: dict[str, tuple[str | int, ...] | None] | None = None
        self._weights = canonical_weights(self.adapter, self.n_layers)
        self._params = dict(self.hf_model.named_parameters(remove_duplicate=False))
        self._modules = dict(self.hf_model.named_modules())
        # one forward at a time: hooks and the attention switch are per model, not per thread
        self._exec_lock = threading.RLock()
        if self.adapter is not None:
            layers = self.adapter.layers
            self._block_paths = [f"{layers}.{i}" for i in range(self.n_layers)]
            attn = self.adapter.attention
            self._attention_paths = {f"{layers}.{i}.{attn}": i for i in range(self.n_layers)} if attn else {}
        else:
            self._block_paths, self._attention_paths = [], {}

    # ----------------------------------------------------------------- description
    @property
    def n_layers(self) -> int:
        return int(getattr(self.config, "num_hidden_layers", 0) or 0)

    @property
    def n_heads(self) -> int:
        return int(getattr(self.config, "num_attention_heads", 0) or 0)

    @property
    def d_model(self) -> int:
        return int(getattr(self.config, "hidden_size", 0) or 0)

    @property
    def d_vocab(self) -> int:
        return int(getattr(self.config, "vocab_size", 0) or 0)

    @property
    def d_mlp(self) -> int:
        value = getattr(self.config, "intermediate_size", None) or getattr(self.config, "n_inner", None)
        return int(value or 4 * self.d_model)

    @property
    def d_head(self) -> int:
        return head_shape(self.config).d_head

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def causal(self) -> bool:
        return self.adapter.causal if self.adapter is not None else bool(
            getattr(self.config, "is_decoder", True))

    def info(self) -> dict[str, Any]:
        """A plain summary: name, family, sizes."""
        return {
            "name": self.name, "family": self.adapter.family if self.adapter else None,
            "model_type": getattr(self.config, "model_type", None), "n_layers": self.n_layers,
            "n_heads": self.n_heads, "d_model": self.d_model, "d_mlp": self.d_mlp,
            "d_head": self.d_head, "d_vocab": self.d_vocab, "causal": self.causal,
        }

    def probe_points(self) -> list[ProbePoint]:
        """Every probe point, canonical ones first (forward order), then module points."""
        shapes = self._discover_shapes()
        return [
            ProbePoint(s.name, s.kind, s.layer, shapes.get(s.name),
                       s.site.module if s.site else None)
            for s in self._specs.values()
        ]

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` (accepts TransformerLens aliases)."""
        if not isinstance(name, str):
            raise UsageError(f"probe point names are strings, not {name!r}")
        return canonical_name(name, self._specs)

    def _discover_shapes(self) -> dict[str, tuple[str | int, ...] | None]:
        """Run one tiny forward with a reader at every point and record symbolic shapes."""
        if self._shapes is not None:
            return self._shapes
        batch, seq = 2, 7
        seen: dict[str, tuple[str | int, ...]] = {}

        def reader(ctx: Any, x: torch.Tensor) -> None:
            dims: list[str | int] = []
            for i, d in enumerate(x.shape):
                dims.append("batch" if i == 0 and d == batch else "seq" if d == seq else int(d))
            seen[ctx.point] = tuple(dims)

        ids = torch.arange(seq).remainder(max(self.d_vocab, 1)).repeat(batch, 1)
        plan = ProbePlan(forward={name: [reader] for name in self._specs})
        txn = self.store.begin()
        try:
            with self._exec_lock:
                self._forward(ids, torch.ones_like(ids), plan, txn.writes("__shapes__"), None,
                              None, grad=False)
        finally:
            txn.rollback()
        self._shapes = {name: seen.get(name) for name in self._specs}
        return self._shapes

    # ----------------------------------------------------------------- running
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, plan: ProbePlan, writes: Any,
                 example_ids: torch.Tensor | None, cancel: Any, *, grad: bool,
                 extra: Mapping[str, Any] | None = None) -> Any:
        device = self.device
        ids, mask = ids.to(device), mask.to(device)
        info = RunInfo(writes=writes, tokens=ids, attention_mask=mask, example_ids=example_ids,
                       model=self, rank=self.rank)
        attachment = Attachment(self.hf_model, self._modules, self._specs, plan, lambda: info, cancel,
                                self._block_paths, self._attention_paths)
        with attachment.attached(), torch.set_grad_enabled(grad):
            return self.hf_model(input_ids=ids, attention_mask=mask, **(extra or {}))

    def _plan(self, probes: Mapping[str, Any] | None, grad_probes: Mapping[str, Any] | None
              ) -> ProbePlan:
        return ProbePlan(_as_plan(probes, self.resolve), _as_plan(grad_probes, self.resolve))

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

    def run(self, inputs: Any, *, probes: Mapping[str, Any] | None = None,
            grad_probes: Mapping[str, Any] | None = None, save: str | None = None,
            backward: bool | Callable[[Outputs], torch.Tensor] | None = None,
            return_logits: bool = True, cancel: Any = None) -> RunResult:
        """One forward pass (and optionally a backward pass) with probes attached.

        ``probes``/``grad_probes`` map point names to ``fn(ctx, x)`` (or lists, applied in
        order). ``backward=True`` backprops the mean next-token cross-entropy; a callable gets
        :class:`Outputs` and returns the scalar to backprop. Parameter gradients are then
        readable with ``param(name, grad=True)`` until the next backward run.
        """
        ids, mask = encode_inputs(inputs, self.tokenizer)
        return self._run_ids(ids, mask, self._plan(probes, grad_probes), save, backward,
                             return_logits, cancel)

    def _run_ids(self, ids: torch.Tensor, mask: torch.Tensor, plan: ProbePlan, save: str | None,
                 backward: Any, return_logits: bool, cancel: Any,
                 example_ids: torch.Tensor | None = None, txn: Transaction | None = None
                 ) -> RunResult:
        if plan.backward and not backward:
            raise UsageError("gradient probes need a backward pass: pass backward=True or a loss function")
        if backward is True and not self.causal:
            raise UsageError("backward=True means next-token loss, which a non-causal model lacks;"
                             " pass a callable that returns the scalar to backprop")
        if backward is not None and backward is not True and backward is not False and not callable(backward):
            raise UsageError(f"backward must be True, None or a callable, not {backward!r}")
        grad = bool(backward)
        with contextlib.ExitStack() as stack:
            if txn is None:
                txn = stack.enter_context(self._transaction())
            writes = txn.writes(save or DEFAULT_CONTEXT)
            if example_ids is None:  # plain runs number their rows per save context
                start = writes.examples_seen
                example_ids = torch.arange(start, start + ids.shape[0], device=self.device)
                writes.examples += ids.shape[0]
            if grad:
                self.hf_model.zero_grad(set_to_none=True)
            out = self._forward(ids, mask, plan, writes, example_ids, cancel, grad=grad)
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = None
            if grad:
                with torch.enable_grad():
                    if self.causal:
                        loss = next_token_loss(logits, ids, mask)
                    objective = loss if backward is True else self._user_objective(
                        backward, Outputs(logits, loss, ids, mask))
                    if objective is None:
                        raise UsageError("nothing to backprop: the inputs have a single token")
                    objective.backward()
            elif not return_logits and self.causal:
                loss = next_token_loss(logits, ids, mask)
            writes.runs += 1
        return RunResult(logits.detach() if return_logits else None,
                         None if loss is None else float(loss.detach()), ids, mask,
                         causal=self.causal)

    @staticmethod
    def _user_objective(fn: Callable[[Outputs], Any], outputs: Outputs) -> torch.Tensor:
        try:
            value = fn(outputs)
        except ClocheError:
            raise
        except Exception as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise ProbeError(f"backward function {name} raised {type(exc).__name__}: {exc}",
                             probe=name) from exc
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise UsageError(f"the backward function must return a scalar tensor, got {value!r}")
        return value.reshape(())

    def generate(self, prompt: Any, max_new_tokens: int = 20, *,
                 probes: Mapping[str, Any] | None = None, save: str | None = None,
                 temperature: float = 0.0, seed: int | None = None, cancel: Any = None
                 ) -> GenerateResult:
        """Continue ``prompt`` (greedy unless ``temperature > 0``) with probes active at every step."""
        if not self.causal:
            raise UsageError("generate needs a causal language model")
        options = generation_options(self.tokenizer, max_new_tokens, temperature)
        ids, mask = encode_inputs(prompt, self.tokenizer, padding_side="left")
        plan = self._plan(probes, None)
        with self._transaction() as txn, torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            writes = txn.writes(save or DEFAULT_CONTEXT)
            info = RunInfo(writes=writes, tokens=ids, attention_mask=mask, example_ids=None,
                           model=self, rank=self.rank)

            def track(module: nn.Module, args: Any, kwargs: dict) -> None:
                if isinstance(kwargs.get("input_ids"), torch.Tensor):
                    info.tokens = kwargs["input_ids"]
                if isinstance(kwargs.get("attention_mask"), torch.Tensor):
                    info.attention_mask = kwargs["attention_mask"]

            attachment = Attachment(self.hf_model, self._modules, self._specs, plan, lambda: info, cancel,
                                    self._block_paths, self._attention_paths)
            handle = self.hf_model.register_forward_pre_hook(track, with_kwargs=True)
            try:
                with attachment.attached(), torch.no_grad():
                    out = self.hf_model.generate(
                        input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **options)
            finally:
                handle.remove()
            writes.runs += 1
        return generate_result(self.tokenizer, out, ids.shape[1])

    def run_dataset(self, dataset: Any, *, probes: Mapping[str, Any] | None = None,
                    save: str | None = None, batch_size: int = 8, limit: int | None = None,
                    progress: bool | Callable[[dict[str, Any]], None] | None = None,
                    cancel: Any = None) -> dict[str, Any]:
        """Run every example of ``dataset`` (or the first ``limit``) with probes and reducers.

        The whole dataset run is one transaction: cancelled or failed, it leaves the save
        context as it was. Returns the save context's reduced results and state.
        """
        from cloche.runtime.datasets import as_dataset, iterate

        ds = as_dataset(dataset, self.tokenizer)
        plan = self._plan(probes, None)
        name = save or DEFAULT_CONTEXT
        totals = {"examples": 0, "tokens": 0}
        with self._transaction() as txn:
            for batch in iterate(ds, batch_size, limit, progress, totals, cancel):
                self._run_ids(batch.tokens, batch.attention_mask, plan, name, None, False,
                              cancel, example_ids=batch.example_ids.to(self.device), txn=txn)
        handle = self.save_context(name)
        results = {r: handle.result(r) for r in handle.reducers()}
        return {"reducers": results, "state": handle.state, **totals,
                "dataset": ds.name, "fingerprint": ds.fingerprint()}

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` next to the model and its save contexts."""
        if not callable(fn):
            raise UsageError(f"call needs a callable, not {fn!r}")
        try:
            return fn(self, *args, **kwargs)
        except ClocheError:
            raise
        except Exception as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise ProbeError(f"function {name} raised {type(exc).__name__}: {exc}",
                             probe=name) from exc

    # ----------------------------------------------------------------- save contexts
    def save_context(self, name: str = DEFAULT_CONTEXT) -> SaveContextHandle:
        if not isinstance(name, str) or not name:
            raise UsageError(f"save context names are non-empty strings, not {name!r}")
        return SaveContextHandle(self.store, name)

    def save_contexts(self) -> list[str]:
        return [n for n in self.store.names() if n != "__shapes__"]

    # ----------------------------------------------------------------- weights & tokens
    def param_names(self, canonical: bool = True) -> list[str]:
        raw = list(self._params)
        return [n for n in self._weights if self._weights[n][0] in self._params] + raw if canonical else raw

    def param(self, name: str, *, grad: bool = False) -> torch.Tensor:
        """A weight (or its gradient after a backward run) by canonical or raw name.

        Canonical layouts follow TransformerLens (see ``cloche.model.weights``). The tensor is
        a detached view: slicing it costs nothing.
        """
        if name in self._weights:
            raw_name, rule = self._weights[name]
            raw = self._params.get(raw_name)
            if raw is None:
                raise UnknownProbePoint(f"this model has no weight {name!r} ({raw_name} is absent)")
            tensor = raw.grad if grad else raw
            if tensor is None:
                raise UsageError(f"{name!r} has no gradient: run with backward= first")
            return apply_layout(tensor.detach(), rule, head_shape(self.config))
        raw = self._params.get(name)
        if raw is None:
            close = [n for n in self._weights if n.endswith(name.split(".")[-1])][:5]
            raise UnknownProbePoint(f"unknown weight {name!r}" + (f"; did you mean {close}?" if close else ""))
        tensor = raw.grad if grad else raw
        if tensor is None:
            raise UsageError(f"{name!r} has no gradient: run with backward= first")
        return tensor.detach()

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        ids, _ = encode_inputs(text, self.tokenizer)
        return ids[0] if isinstance(text, str) else ids

    def decode(self, ids: Any) -> str:
        if self.tokenizer is None:
            raise UsageError("this model has no tokenizer")
        return self.tokenizer.decode(torch.as_tensor(ids).tolist())

    def to_str_tokens(self, ids: Any) -> list[str]:
        if self.tokenizer is None:
            raise UsageError("this model has no tokenizer")
        if isinstance(ids, str):
            ids = self.tokenize(ids)
        return [self.tokenizer.decode([int(i)]) for i in torch.as_tensor(ids).reshape(-1)]

    def __repr__(self) -> str:
        family = self.adapter.family if self.adapter else "generic"
        return f"Model({self.name!r}, {family}, layers={self.n_layers}, d_model={self.d_model})"
