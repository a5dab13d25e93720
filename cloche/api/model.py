"""``cloche.Model``: the one model API, over any executor.

``cloche.load(...)``, ``cloche.connect(...)`` and a sharded launch all return this class. It holds
everything that is validation and result assembly — input encoding, probe plans and name
resolution ("did you mean"), backward checks, generation options, save-context names, ranks —
and hands each operation to its executor as one request record (``cloche.api.requests``).
Every public method is written once: ``_prepare_<method>`` builds the request and the function
that turns the executor's output into the user's result, and both ``model.run(...)`` and
``model.submit("run", ...)`` use it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from cloche.api import requests as rq
from cloche.api.futures import RequestFuture
from cloche.api.handle import SaveContextHandle, SaveContexts
from cloche.api.inputs import encode_inputs, is_text
from cloche.api.progress import Progress, ProgressArg
from cloche.api.results import GenerateResult, RunResult, generate_result
from cloche.dictionaries.modules import build_dictionary
from cloche.dictionaries.source import convention_notes, dictionary_source
from cloche.errors import UsageError
from cloche.model.info import no_head_message
from cloche.model.points import ProbePoint, canonical_name
from cloche.probes.refs import encode_index

if TYPE_CHECKING:
    from typing_extensions import Self

    from cloche.api.executor import CancelEvent, EventSink, Executor

__all__ = ["DEFAULT_CONTEXT", "Model"]

DEFAULT_CONTEXT = "default"

Prepared = tuple[rq.Request[Any], Callable[[Any], Any]]

#: the methods that report progress (``progress=``), also through ``submit``
_REPORTING = ("run", "generate", "run_dataset")


def _identity(value: Any) -> Any:
    return value


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{what} must be a positive int, not {value!r}")
    return value


def _context_name(name: Any) -> str:
    if name is None:
        return DEFAULT_CONTEXT
    if not isinstance(name, str) or not name:
        raise UsageError(f"save context names are non-empty strings, not {name!r}")
    return name


def generation_options(tokenizer: Any, max_new_tokens: Any, temperature: Any) -> dict[str, Any]:
    """Validated keyword arguments for Hugging Face ``generate`` (greedy unless temperature > 0)."""
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or temperature < 0:
        raise UsageError(f"temperature must be a number >= 0, not {temperature!r}")
    pad = getattr(tokenizer, "pad_token_id", None) if tokenizer else None
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer else None
    options: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "do_sample": temperature > 0,
        "pad_token_id": pad if pad is not None else (eos if eos is not None else 0),
    }
    if temperature > 0:
        options.update(temperature=float(temperature), top_k=0, top_p=1.0)
    return options


class Model:
    """A model with probe points, save contexts and canonical weights, wherever it runs.

    Probes are ``fn(ctx, x)`` attached at named probe points (canonical names, TransformerLens
    aliases or ``module:<path>:input|output``); they return ``None`` (keep ``x``) or a
    replacement. Save contexts keep what probes save across runs; every run is a transaction.
    """

    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        #: how text becomes tokens (token ids are always used as given): ``prepend_bos``
        #: ``None`` = as the tokenizer does by itself, ``True``/``False`` = always/never a BOS
        #: token; ``padding_side`` for batches of texts in ``run`` (``generate`` pads left).
        #: Both change results silently when they differ from another tool's: set them here.
        self.prepend_bos: bool | None = None
        self.padding_side: str = "right"
        self._info: rq.ModelInfo | None = None
        self._names: frozenset[str] | None = None
        self._points: list[ProbePoint] | None = None

    # ----------------------------------------------------------------- description
    @property
    def executor(self) -> Executor:
        """What runs this model (local, sharded, remote): the seam below the API."""
        return self._executor

    def _described(self) -> rq.ModelInfo:
        if self._info is None:
            self._info = self._executor.describe()
        return self._info

    name = property(lambda self: self._described().name)
    n_layers = property(lambda self: self._described().n_layers)
    n_heads = property(lambda self: self._described().n_heads)
    n_kv_heads = property(lambda self: self._described().n_kv_heads)
    d_model = property(lambda self: self._described().d_model)
    d_mlp = property(lambda self: self._described().d_mlp)
    d_head = property(lambda self: self._described().d_head)
    d_vocab = property(lambda self: self._described().d_vocab)
    causal = property(lambda self: self._described().causal)
    world_size = property(lambda self: self._described().world_size)
    rank = property(lambda self: self._described().rank,
                    doc="0, or k inside a function shipped with call(fn, rank=k)")

    @property
    def device(self) -> torch.device:
        return torch.device(self._described().device)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer, in this process (a remote model's is loaded from the server's files)."""
        return self._executor.tokenizer

    @property
    def config(self) -> Any:
        """The Hugging Face config, in this process."""
        return self._executor.config

    @property
    def hf_model(self) -> torch.nn.Module:
        """The underlying transformers module — only where the model runs in this process
        (elsewhere, reach it from a function shipped with :meth:`call`)."""
        module = getattr(self._executor, "hf_model", None)
        if not isinstance(module, torch.nn.Module):
            raise UsageError("this model does not run in this process: use model.call(fn) to"
                             " run code next to it")
        return module

    def info(self) -> dict[str, Any]:
        """A plain summary: name, family, sizes, device, world size."""
        return self._described().summary()

    def probe_points(self) -> list[ProbePoint]:
        """Every probe point with its shape, canonical points first (forward order)."""
        if self._points is None:
            self._points = list(self._executor.execute(rq.ProbePoints()))
        return list(self._points)

    def resolve(self, name: str) -> str:
        """The canonical name for ``name`` (accepts TransformerLens aliases)."""
        if not isinstance(name, str):
            raise UsageError(f"probe point names are strings, not {name!r}")
        if self._names is None:
            self._names = frozenset(self._described().point_names)
        if name.startswith(rq.DERIVED_PREFIX) and name not in self._names:
            self._forget_points()  # attached since this model was described (another client)
            self._names = frozenset(self._described().point_names)
        described = self._described()
        return canonical_name(name, self._names, described.missing, described.model_type)

    def owner_of(self, point: str) -> int:
        """The rank whose probes run at ``point`` (always 0 unless the model is sharded)."""
        return self._executor.execute(rq.Owner(point=self.resolve(point)))

    # ----------------------------------------------------------------- building requests
    def _plan(self, probes: Mapping[str, Any] | None, what: str = "probes") -> rq.ProbePlanSpec:
        if probes is None:
            return {}
        if not isinstance(probes, Mapping):
            raise UsageError(f"{what} map probe point names to functions, not"
                             f" {type(probes).__name__}")
        plan: rq.ProbePlanSpec = {}
        for name, fns in probes.items():
            fns = list(fns) if isinstance(fns, (list, tuple)) else [fns]
            for fn in fns:
                if not callable(fn):
                    raise UsageError(f"the probe at {name!r} is not callable: {fn!r}")
            plan.setdefault(self.resolve(name), []).extend(fns)
        return plan

    def _encode(self, inputs: Any, padding_side: str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        tokenizer = self.tokenizer if is_text(inputs) else None
        return encode_inputs(inputs, tokenizer, padding_side=padding_side or self.padding_side,
                             prepend_bos=self.prepend_bos)

    def _prepare_run(self, inputs: Any, *, probes: Mapping[str, Any] | None = None,
                     grad_probes: Mapping[str, Any] | None = None, save: str | None = None,
                     backward: bool | Callable[..., torch.Tensor] | None = None,
                     return_logits: bool = True, return_loss: bool = False,
                     micro_batches: int = 1) -> Prepared:
        ids, mask = self._encode(inputs)
        forward = self._plan(probes)
        backward_probes = self._plan(grad_probes, "grad_probes")
        if backward is False:
            backward = None
        if backward is not None and backward is not True and not callable(backward):
            raise UsageError(f"backward must be True, None or a callable, not {backward!r}")
        if backward_probes and backward is None:
            raise UsageError("gradient probes need a backward pass: pass backward=True or a loss"
                             " function")
        if backward is not None and not self._described().lm_head:
            raise UsageError(no_head_message(self.name, "backward"))
        if backward is True and not self.causal:
            raise UsageError("backward=True means next-token loss, which a non-causal model"
                             " lacks; pass a callable that returns the scalar to backprop")
        request = rq.Run(ids=ids, mask=mask, forward=forward, backward_probes=backward_probes,
                         save=_context_name(save), backward=backward,
                         return_logits=bool(return_logits),
                         return_loss=bool(return_loss) and self.causal,
                         micro_batches=_positive_int(micro_batches, "micro_batches"))
        causal = self.causal

        def finish(out: rq.RunOutput) -> RunResult:
            return RunResult(out.logits, out.loss, ids, mask, causal=causal)

        return request, finish

    def _prepare_generate(self, prompt: Any, max_new_tokens: int = 20, *,
                          probes: Mapping[str, Any] | None = None, save: str | None = None,
                          temperature: float = 0.0, seed: int | None = None) -> Prepared:
        if not self._described().lm_head:
            raise UsageError(no_head_message(self.name, "generate"))
        if not self.causal:
            raise UsageError("generate needs a causal language model")
        tokenizer = self.tokenizer if is_text(prompt) else None
        ids, mask = encode_inputs(prompt, tokenizer, padding_side="left",
                                  prepend_bos=self.prepend_bos)
        options = generation_options(self.tokenizer, max_new_tokens, temperature)
        if seed is None:  # drawn here, so that every rank of a sharded model samples alike
            seed = int(torch.randint(0, 2**62, ()).item())
        elif isinstance(seed, bool) or not isinstance(seed, int):
            raise UsageError(f"seed must be an int or None, not {seed!r}")
        request = rq.Generate(ids=ids, mask=mask, forward=self._plan(probes),
                              save=_context_name(save), options=options, seed=seed)
        prompt_len = ids.shape[1]

        def finish(tokens: torch.Tensor) -> GenerateResult:
            return generate_result(self.tokenizer, tokens, prompt_len)

        return request, finish

    def _prepare_run_dataset(self, dataset: Any, *, probes: Mapping[str, Any] | None = None,
                             save: str | None = None, batch_size: int = 8,
                             limit: int | None = None, micro_batches: int = 1,
                             checkpoint_every: int | None = None, resume: bool = False,
                             export: Any = None, export_points: Sequence[str] | None = None,
                             export_dtype: str = "float16",
                             export_shard_tokens: int = 1 << 16) -> Prepared:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit < 0):
            raise UsageError(f"limit must be None or an int >= 0, not {limit!r}")
        if isinstance(export_points, str):
            export_points = [export_points]
        request = rq.RunDataset(dataset=dataset, forward=self._plan(probes),
                                save=_context_name(save),
                                batch_size=_positive_int(batch_size, "batch_size"), limit=limit,
                                micro_batches=_positive_int(micro_batches, "micro_batches"),
                                checkpoint_every=(None if checkpoint_every is None else
                                                  _positive_int(checkpoint_every,
                                                                "checkpoint_every")),
                                resume=resume,
                                export=None if export is None else os.fspath(export),
                                export_points=tuple(export_points or ()),
                                export_dtype=export_dtype,
                                export_shard_tokens=export_shard_tokens)
        request.check(None)  # the server checks again, with the model's point names
        return request, _identity

    def _prepare_call(self, fn: Callable[..., Any], *args: Any, rank: int | str | None = None,
                      **kwargs: Any) -> Prepared:
        if not callable(fn):
            raise UsageError(f"call needs a callable, not {fn!r}")
        world = self.world_size
        if not (rank is None or rank == "all" or (isinstance(rank, int) and not isinstance(
                rank, bool) and 0 <= rank < world)):
            raise UsageError(f"rank must be None, 'all' or an int in [0, {world}), not {rank!r}")
        return rq.Call(fn=fn, args=args, kwargs=kwargs, rank=rank), _identity

    def _prepare_param(self, name: str, *, grad: bool = False, index: Any = None) -> Prepared:
        if not isinstance(name, str) or not name:
            raise UsageError(f"weight names are non-empty strings, not {name!r}")
        items = None if index is None else encode_index(index)[1]
        return rq.Param(name=name, grad=bool(grad), index=items), _identity

    def _prepare_param_names(self, canonical: bool = True) -> Prepared:
        return rq.ParamNames(canonical=bool(canonical)), _identity

    def _prepare_save_contexts(self) -> Prepared:
        return rq.ListContexts(), _identity

    def _prepare_probe_points(self) -> Prepared:
        return rq.ProbePoints(), list

    def _prepare_ping(self, value: Any = None) -> Prepared:
        return rq.Ping(value=value), _identity

    def _prepare_server_status(self) -> Prepared:
        return rq.ServerStatus(), _identity

    def _execute(self, prepared: Prepared, cancel: CancelEvent | None = None,
                 on_event: EventSink | None = None) -> Any:
        request, finish = prepared
        return finish(self._executor.execute(request, cancel=cancel, on_event=on_event))

    def _execute_reporting(self, prepared: Prepared, progress: ProgressArg, desc: str,
                           cancel: CancelEvent | None, unit: str = "it") -> Any:
        """``_execute`` with its progress shown as ``progress`` says (``cloche.api.progress``).
        Work in this process never queues, so it has started when it is handed over."""
        with Progress(progress, desc, unit=unit) as reporter:
            if self.address is None:
                reporter.begin()
            return self._execute(prepared, cancel, reporter)

    # ----------------------------------------------------------------- running
    def run(self, inputs: Any, *, probes: Mapping[str, Any] | None = None,
            grad_probes: Mapping[str, Any] | None = None, save: str | None = None,
            backward: bool | Callable[..., torch.Tensor] | None = None,
            return_logits: bool = True, return_loss: bool = False, micro_batches: int = 1,
            cancel: CancelEvent | None = None, progress: ProgressArg = True) -> RunResult:
        """One forward pass (and optionally a backward pass) with probes attached.

        ``inputs``: text, a list of texts, token ids ``(seq,)``/``(batch, seq)``, or a dict
        with ``input_ids`` (and ``attention_mask``). ``probes``/``grad_probes`` map point
        names to ``fn(ctx, x)`` (or lists, applied in order); what they save goes to the save
        context ``save`` (``"default"``). ``backward=True`` backprops the mean next-token
        cross-entropy; a callable gets :class:`~cloche.Outputs` and returns the scalar to
        backprop; parameter gradients are then readable with ``param(name, grad=True)``.
        ``micro_batches`` > 1 splits a forward-only batch (probes run once per micro-batch).
        ``cancel`` (a ``threading.Event``) stops the run at the next layer when set.
        ``progress``: as everywhere (``cloche.api.progress``): a bar only for a run that is
        queued or outlives a second, a callable for the events, ``False`` for nothing.

        What is computed follows what is asked: ``result.loss`` comes from the returned logits
        on first access; ``return_loss=True`` computes it where the model runs instead (only a
        float crosses the wire, useful with ``return_logits=False``). With neither, the
        unembedding is skipped where the model allows (no probe at ``logits``): a probing run
        then costs less than the plain forward.
        """
        return self._execute_reporting(self._prepare_run(
            inputs, probes=probes, grad_probes=grad_probes, save=save, backward=backward,
            return_logits=return_logits, return_loss=return_loss,
            micro_batches=micro_batches), progress, "run", cancel)

    def generate(self, prompt: Any, max_new_tokens: int = 20, *,
                 probes: Mapping[str, Any] | None = None, save: str | None = None,
                 temperature: float = 0.0, seed: int | None = None,
                 cancel: CancelEvent | None = None, progress: ProgressArg = True
                 ) -> GenerateResult:
        """Continue ``prompt`` (greedy unless ``temperature > 0``) with probes active at every
        step; ``seed`` makes sampling reproducible. ``progress`` as for :meth:`run`."""
        return self._execute_reporting(self._prepare_generate(
            prompt, max_new_tokens, probes=probes, save=save, temperature=temperature,
            seed=seed), progress, "generate", cancel)

    def run_dataset(self, dataset: Any, *, probes: Mapping[str, Any] | None = None,
                    save: str | None = None, batch_size: int = 8, limit: int | None = None,
                    progress: ProgressArg = True,
                    micro_batches: int = 1, cancel: CancelEvent | None = None,
                    checkpoint_every: int | None = None, resume: bool = False,
                    export: Any = None, export_points: Sequence[str] | None = None,
                    export_dtype: str = "float16", export_shard_tokens: int = 1 << 16
                    ) -> dict[str, Any]:
        """Run every example of ``dataset`` (or the first ``limit``) with probes and reducers.

        ``dataset``: a ``cloche.data.Dataset``, a name (``"default:heldout"``, a path, a token
        file ``"x.npy?seq_len=1024"``, ``"hf:..."``: see ``docs/datasets.md``) or a list of
        texts — names and texts are resolved where the model runs, and files are read there.
        The whole run is one transaction: cancelled or failed, it leaves the save context as it
        was. ``progress``: a tqdm bar (``True``: counts examples, shown once the run is queued
        or outlives a second), a callable receiving every event dict ("started", "queued" with
        ``position``/``ahead``, "progress" with ``done``/``total``/``tokens``/``eta``, "done"
        last), or ``False`` for nothing (``cloche.api.progress`` has the rules). Returns the
        totals and the save context's reduced results and state.

        Long runs: ``checkpoint_every=N`` checkpoints the run's pending writes (reducers,
        ``ctx.state``, saves, its place in the dataset) every N batches — on disk when the
        model has a state dir (``cloche serve --state-dir``), so they survive a crash. The
        same call with ``resume=True`` then continues from the last checkpoint (or starts, if
        there is none) and gives results identical to an uninterrupted run; the save context
        still changes only when the whole run commits.

        ``export=dir`` writes the activations at ``export_points`` (real tokens only) as
        ``export_dtype`` safetensors shards of ``export_shard_tokens`` tokens or so, with a
        ``manifest.json`` (example ids, positions, shapes, dtype); ``dir`` is on the machine
        the model runs on. Complete shards survive a cancel or a crash and the same call
        skips them: an export resumes by itself.
        """
        return self._execute_reporting(self._prepare_run_dataset(
            dataset, probes=probes, save=save, batch_size=batch_size, limit=limit,
            micro_batches=micro_batches, checkpoint_every=checkpoint_every, resume=resume,
            export=export, export_points=export_points, export_dtype=export_dtype,
            export_shard_tokens=export_shard_tokens), progress, "run_dataset", cancel,
            unit="ex")

    def call(self, fn: Callable[..., Any], *args: Any, rank: int | str | None = None,
             **kwargs: Any) -> Any:
        """Run ``fn(model, *args, **kwargs)`` next to the model and its save contexts.

        ``rank=None``: with the whole model. On a sharded model, ``rank=k`` runs it on rank
        ``k`` with that rank's shard and ``rank="all"`` on every rank (``{rank: result}``).
        (Inside an experiment, its queue events go to the experiment's progress; keyword
        arguments are ``fn``'s, so ``call`` itself takes no ``progress=``.)
        """
        prepared = self._prepare_call(fn, *args, rank=rank, **kwargs)
        parent = Progress.current()
        if parent is None:
            return self._execute(prepared)
        return self._execute_reporting(prepared, parent, "call", None)

    def submit(self, method: str, *args: Any, on_event: EventSink | None = None,
               **kwargs: Any) -> RequestFuture[Any]:
        """Start ``method(*args, **kwargs)`` and return a future at once.

        ``future.cancel()`` stops the work where it runs (at its next layer or batch).
        ``on_event`` receives the request's events: ``{"type": "queued", "position": n,
        "ahead": k}`` on a busy server, ``{"type": "started"}``, and ``{"type": "progress",
        ...}`` for ``run_dataset``. ``run``, ``generate`` and ``run_dataset`` also take
        ``progress=`` as they do when called (here quiet unless given: the caller goes on).
        """
        prepare = getattr(self, f"_prepare_{method}", None) if isinstance(method, str) else None
        if prepare is None:
            raise UsageError(f"submit takes one of {sorted(self.submittable())}, not {method!r}")
        progress = kwargs.pop("progress", None) if method in _REPORTING else None
        request, finish = prepare(*args, **kwargs)  # (bad arguments: no reporter is left behind)
        reporter = None
        if method in _REPORTING:
            reporter = Progress(progress, method, unit="ex" if method == "run_dataset" else "it")
            on_event = _both(reporter, on_event)
            if self.address is None:
                reporter.begin()
        try:
            future = self._executor.submit(request, on_event=on_event)
        except BaseException:
            if reporter is not None:
                reporter.close(ok=False)
            raise
        if reporter is not None:
            done = reporter
            future.add_done_callback(lambda f: done.close(ok=not f.cancelled()
                                                          and f.exception() is None))
        return future.then(finish)

    @classmethod
    def submittable(cls) -> list[str]:
        """The method names :meth:`submit` accepts."""
        return sorted(n[len("_prepare_"):] for n in dir(cls) if n.startswith("_prepare_"))

    def ping(self, value: Any = None) -> Any:
        """A round trip to where the model runs (echoes ``value``)."""
        return self._execute(self._prepare_ping(value))

    def server_status(self) -> dict[str, Any]:
        """What the server is doing: its queue (your requests named, others' counted), the
        running request, sessions, connections, memory. Only a connected model has a server."""
        return self._execute(self._prepare_server_status())

    # ----------------------------------------------------------------- save contexts
    def save_context(self, name: str = DEFAULT_CONTEXT) -> SaveContextHandle:
        """A handle on the save context ``name`` (it need not exist yet)."""
        return SaveContextHandle(self._executor, _context_name(name))

    def save_contexts(self) -> SaveContexts:
        """The names of the save contexts that hold something (a list of str, which in a
        notebook shows each context's runs, keys and size)."""
        return SaveContexts(self._execute(self._prepare_save_contexts()), self._executor)

    # ----------------------------------------------------------------- weights & tokens
    def param_names(self, canonical: bool = True) -> list[str]:
        """Canonical weight names (those that exist) then raw parameter names."""
        return self._execute(self._prepare_param_names(canonical))

    def param(self, name: str, *, grad: bool = False, index: Any = None) -> torch.Tensor:
        """A weight (or its gradient after a backward run) by canonical or raw name.

        Canonical layouts follow TransformerLens (see ``cloche.model.weights``), and so do
        TransformerLens' own names (``blocks.0.attn.W_Q``, ``W_E``). ``index`` (an int, a
        slice or a tuple of them, e.g. ``index=3`` for head 3 of ``W_Q``) is applied to the
        canonical tensor where the weight lives: only that part is copied and sent. An
        attached dictionary's weights are ``dict:<name>:W_enc`` (``b_enc``, ``W_dec``, ...).
        """
        return self._execute(self._prepare_param(name, grad=grad, index=index))

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        """Token ids of ``text`` as ``run`` makes them (``prepend_bos``, ``padding_side``):
        ``(seq,)`` for a string, ``(batch, seq)`` for a list."""
        if not is_text(text):
            raise UsageError(f"tokenize takes a string or a list of strings, not {text!r}")
        ids, _ = encode_inputs(text, self.tokenizer, padding_side=self.padding_side,
                               prepend_bos=self.prepend_bos)
        return ids[0] if isinstance(text, str) else ids

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True) -> str:
        """An instruct model's prompt for ``messages`` (``[{"role": "user", "content": ...}]``),
        as its tokenizer's chat template writes it; pass the text to ``run``/``generate``
        (with ``prepend_bos = False`` if the template already starts with the BOS token)."""
        tokenizer = self._need_tokenizer()
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{self.name}'s tokenizer has no chat template (not an instruct"
                             " model?): write the prompt yourself")
        text = tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
        return str(text)

    def _need_tokenizer(self) -> Any:
        tokenizer = self.tokenizer
        if tokenizer is None:
            raise UsageError("this model has no tokenizer")
        return tokenizer

    def decode(self, ids: Any) -> str:
        return self._need_tokenizer().decode(torch.as_tensor(ids).tolist())

    def to_str_tokens(self, ids: Any) -> list[str]:
        """One string per token (``ids`` may also be text, tokenized first)."""
        tokenizer = self._need_tokenizer()
        if isinstance(ids, str):
            ids = self.tokenize(ids)
        return [tokenizer.decode([int(i)]) for i in torch.as_tensor(ids).reshape(-1)]

    # ----------------------------------------------------------------- dictionaries
    def attach_dictionary(self, name: str, source: Any, *, point: str | None = None,
                          architecture: str | None = None, k: int | None = None,
                          on_server: bool = False, apply_conventions: bool = False,
                          out_point: str | None = None) -> dict[str, Any]:
        """Attach a sparse dictionary at ``point`` under ``name``, where the point lives.

        ``source``: a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``; read here, or
        where the model runs with ``on_server=True``), a ``cloche.dictionaries.SparseDictionary``
        or a dict of tensors (``W_enc``, ``b_enc``, ``W_dec``, ``b_dec`` [, ``threshold``]; then
        ``architecture`` and ``k`` say what it is). ``point`` defaults to the dictionary's
        ``hook_name`` (TransformerLens names are understood); a transcoder also writes
        ``out_point`` (default: its ``hook_name_out``). Its features, reconstruction and
        error become the probe points ``dict:<name>:features|reconstruction|error``: probes
        read and edit them like any point, and an edit changes the run through
        reconstruction + error (with no edit the run is the plain model's, bit for bit).

        When the dictionary was trained with other conventions than this model uses
        (``prepend_bos``, ``context_size``) a warning says so; ``apply_conventions=True`` sets
        ``model.prepend_bos`` to the dictionary's. Returns the dictionary's summary.
        """
        if not isinstance(name, str) or not name or ":" in name:
            raise UsageError(f"dictionary names are non-empty strings without ':', not {name!r}")
        config, weights, path = dictionary_source(source, point, architecture, k, on_server)
        hook = point if point is not None else (config.hook_name if config else None)
        if hook is None and path is None:
            raise UsageError(f"dictionary {name!r} names no hook_name: pass point=...")
        if out_point is None and config is not None and config.transcoder:
            out_point = config.hook_name_out
        request = rq.AttachDictionary(
            name=name, point=None if hook is None else self.resolve(hook), build=build_dictionary,
            config=None if config is None else config.to_cfg(), weights=weights, path=path,
            out_point=None if out_point is None else self.resolve(out_point))
        summary = dict(self._executor.execute(request))
        self._forget_points()
        notes = self._convention_notes(summary)
        if apply_conventions and summary.get("prepend_bos") is not None:
            self.prepend_bos = bool(summary["prepend_bos"])
            notes = self._convention_notes(summary)
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=2)
        summary["notes"] = notes
        return summary

    def detach_dictionary(self, name: str) -> None:
        """Remove the dictionary ``name`` and its probe points."""
        if not isinstance(name, str) or not name:
            raise UsageError(f"dictionary names are non-empty strings, not {name!r}")
        self._executor.execute(rq.DetachDictionary(name=name))
        self._forget_points()

    def dictionaries(self) -> dict[str, dict[str, Any]]:
        """The attached dictionaries: name -> summary (point, sizes, rank, conventions)."""
        return dict(self._executor.execute(rq.Dictionaries()))

    def _forget_points(self) -> None:
        """Attaching changes the point names: describe the model afresh."""
        self._info = self._executor.execute(rq.Describe())
        self._names = None
        self._points = None

    def _convention_notes(self, summary: Mapping[str, Any]) -> list[str]:
        return convention_notes(summary, self.tokenizer, self.prepend_bos,
                                self._described().max_positions)

    # ----------------------------------------------------------------- connection & lifecycle
    @property
    def session(self) -> str | None:
        """A remote model's session id (``cloche.connect(..., session=...)`` resumes it)."""
        return getattr(self._executor, "session", None)

    @property
    def address(self) -> str | None:
        """A remote model's ``host:port``."""
        return getattr(self._executor, "address", None)

    def close(self) -> None:
        """Release the executor: a connection, or the worker processes of a sharded model."""
        self._executor.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self._described()
        where = f", world_size={info.world_size}" if info.world_size > 1 else ""
        if self.address:
            where += f", at {self.address}"
        return (f"Model({info.name!r}, {info.family or 'generic'}, layers={info.n_layers},"
                f" d_model={info.d_model}{where})")


def _both(first: EventSink, second: EventSink | None) -> EventSink:
    if second is None:
        return first

    def both(event: dict[str, Any]) -> None:
        first(event)
        second(event)

    return both
