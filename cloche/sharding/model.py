"""Rank 0's face: a model sharded over many ranks, behind the same API as the local Model.

``DistributedModel`` implements the Model API (``probe_points``, ``resolve``, ``run``,
``generate``, ``run_dataset``, ``save_context``, ``param``, ``call``, ``info``, tokenizing) by
sending each request to every rank as a command and letting each rank's stage do its part. The
server serves it exactly like a local model: a client cannot tell the world size.

Commands are serialised (one at a time), so a light request (a fetch) waits for a running one.
When a rank is lost, the request in flight raises :class:`~cloche.errors.WorkerLost` naming the
rank, every later request does too, and ``on_lost`` is called (the launcher exits the process).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle
import torch

from cloche import errors
from cloche.sharding.channel_keys import keys
from cloche.sharding.control import Aborted, Control
from cloche.sharding.handle import DistSaveContextHandle
from cloche.sharding.p2p import Channel
from cloche.sharding.stage import Command, Stage, error_envelope
from cloche.sharding.worker import Rank
from cloche.errors import ClocheError, UnknownProbePoint, UsageError, WorkerLost
from cloche.model.points import ProbePoint, canonical_name
from cloche.model.weights import canonical_weights
from cloche.runtime.inputs import encode_inputs
from cloche.runtime.model import (
    DEFAULT_CONTEXT,
    GenerateResult,
    RunResult,
    _as_plan,
    generate_result,
    generation_options,
)

__all__ = ["DistributedModel"]

_TRANSACTIONAL = ("run", "generate", "dataset")


def _shippable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, or the user function inside a ``functools.wraps`` wrapper that cannot travel.

    The server wraps shipped functions to hand them its session view of the model; on another
    rank that view does not exist (the function gets the rank's shard), so the wrapper —
    which holds the view — stays behind.
    """
    inner = getattr(fn, "__wrapped__", None)
    if inner is None:
        return fn
    try:
        cloudpickle.dumps(fn)
    except Exception:  # noqa: BLE001 - any pickling failure: fall back to the user function
        return inner
    return fn


class DistributedModel:
    """A model sharded by layers over ``world_size`` ranks; this object lives on rank 0."""

    def __init__(self, rank: Rank, *, on_lost: Callable[[WorkerLost], None] | None = None,
                 micro_batches: int = 1) -> None:
        if rank.layout.rank != 0:
            raise UsageError(f"DistributedModel lives on rank 0, not rank {rank.layout.rank}")
        self._rank = rank
        self._stage = rank.stage
        self._control = rank.control
        self._channel = rank.channel
        self._lock = threading.RLock()
        self._seq = 0
        self._light_lock = threading.Lock()
        self._light_seq = [0] * rank.layout.world_size
        light_control = Control(rank.layout.new_store_client(), None, 0,
                                rank.layout.world_size, rank.config.timeout_s,
                                rank.config.heartbeat_s)
        light_control.liveness = self._control.liveness  # one view of who is alive
        self._light_channel = Channel(light_control, 0, rank.layout.device,
                                      rank.layout.tensor_group, rank.layout.object_group,
                                      announce=False)
        self._broken: WorkerLost | None = None
        self._on_lost = on_lost
        self._shapes: dict[str, Any] | None = None
        self._closed = False
        self.micro_batches = micro_batches
        local = self._stage.local
        self.hf_config = local.config
        self.config = local.config
        self.tokenizer = local.tokenizer
        self.path = local.path
        self.name = local.name
        self.adapter = self._stage.adapter
        self.plan = self._stage.plan
        self.world_size = rank.layout.world_size
        self.rank = 0
        self.serve_options: dict[str, Any] = {}
        self.group: Any = None  # the worker processes, when started by cloche.sharding.launch
        self._on_close: list[Callable[[], None]] = []
        self._local = local
        self._specs = self._stage.full_specs
        self._weights = canonical_weights(self.adapter, self.plan.n_layers)
        self._control.on_lost = self._lost
        self._control.watch_idle = True

    # ----------------------------------------------------------------- description
    n_layers = property(lambda self: self._local.n_layers)
    n_heads = property(lambda self: self._local.n_heads)
    d_model = property(lambda self: self._local.d_model)
    d_vocab = property(lambda self: self._local.d_vocab)
    d_mlp = property(lambda self: self._local.d_mlp)
    d_head = property(lambda self: self._local.d_head)
    causal = property(lambda self: self._local.causal)

    @property
    def device(self) -> torch.device:
        return self._rank.layout.device

    def info(self) -> dict[str, Any]:
        info = self._local.info()
        info.update(world_size=self.world_size, layers_per_rank=self.plan.layers_per_rank())
        return info

    def probe_points(self) -> list[ProbePoint]:
        if self._shapes is None:
            per_rank = self._command("shapes", batch=2, seq=7)
            shapes: dict[str, Any] = {}
            for found in per_rank:
                shapes.update(found)
            self._shapes = shapes
        return [ProbePoint(s.name, s.kind, s.layer, self._shapes.get(s.name),
                           s.site.module if s.site else None) for s in self._specs.values()]

    def resolve(self, name: str) -> str:
        if not isinstance(name, str):
            raise UsageError(f"probe point names are strings, not {name!r}")
        return canonical_name(name, self._specs)

    def owner_of(self, point: str) -> int:
        """The rank that runs probes at ``point``."""
        return self._stage.ownership.point_owner(self._specs[self.resolve(point)])

    # ----------------------------------------------------------------- commands
    def _lost(self, exc: WorkerLost) -> None:
        if self._broken is None:
            self._broken = exc
        if self._on_lost is not None and not self._closed:
            threading.Thread(target=self._on_lost, args=(exc,), daemon=True).start()

    def _command(self, op: str, *, cancel: Any = None, local: dict | None = None,
                 after: Callable[[], Any] | None = None, **kwargs: Any) -> Any:
        with self._lock:
            if self._broken is not None:
                raise WorkerLost(f"this sharded model is unusable: {self._broken.message}",
                                 rank=self._broken.rank)
            if self._closed:
                raise UsageError("the distributed model was closed")
            self._seq += 1
            seq = self._seq
            cmd = Command(seq, op, kwargs)
            try:
                payload = cloudpickle.dumps(cmd)
            except Exception as exc:
                raise UsageError(f"cannot ship the {op} request to the other ranks: {exc}"
                                 ) from exc
            store = self._control.store
            try:
                store.set(f"cmd/{seq}", payload)
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
                            envelopes[0] = error_envelope(exc, aborted=isinstance(exc, Aborted))
                    for r in range(1, self.world_size):
                        envelopes.append(self._channel.recv_object(r, keys.result(seq, r),
                                                                   abortable=False))
                finally:
                    self._control.end()
                store.delete_key(f"cmd/{seq}")
                store.delete_key(f"abort/{seq}")
            except WorkerLost as exc:
                self._lost(exc)
                raise
            ok = all(e["ok"] for e in envelopes)
            if op in _TRANSACTIONAL:
                self._stage.settle(seq, ok)
                try:
                    store.set(f"decide/{seq}", "1" if ok else "0")
                except RuntimeError as exc:
                    lost = WorkerLost(f"the control store failed: {exc}", rank=0)
                    self._lost(lost)
                    raise lost from exc
                self._await_settled(seq)
            if not ok:
                raise self._failure(envelopes, own_error)
            values = [e["value"] for e in envelopes]
            return (values, extra) if after is not None else values

    def _await_settled(self, seq: int) -> None:
        """Wait until every worker applied the decision, so reads that follow see it."""
        store = self._control.store
        deadline_checks = 0
        delay = 1e-4
        try:
            while int(store.add(f"settled/{seq}", 0)) < self.world_size - 1:
                time.sleep(delay)
                delay = min(delay * 2, 0.01)
                deadline_checks += 1
                if deadline_checks % 20 == 0:
                    self._control.liveness.check()
            store.delete_key(f"settled/{seq}")
            store.delete_key(f"decide/{seq}")  # every worker read it before counting itself
        except WorkerLost as exc:
            self._lost(exc)
            raise
        except RuntimeError as exc:
            lost = WorkerLost(f"the control store failed: {exc}", rank=0)
            self._lost(lost)
            raise lost from exc

    def _failure(self, envelopes: list[dict], own: BaseException | None) -> ClocheError:
        failed = [(r, e) for r, e in enumerate(envelopes) if not e["ok"]]
        roots = [(r, e) for r, e in failed if not e.get("aborted")]
        rank, env = (roots or failed)[0]
        if rank == 0 and isinstance(own, ClocheError):
            return own
        if rank == 0 and isinstance(own, Exception) and not roots:
            return errors.Cancelled("the request was cancelled")
        cls = getattr(errors, env["type"], None)
        if not (isinstance(cls, type) and issubclass(cls, ClocheError)) or cls is Aborted:
            cls = errors.RemoteError
        message = env["message"]
        if cls is errors.RemoteError and env["type"] != "RemoteError":
            message = f"{env['type']}: {message}"
        tb = env.get("traceback") if rank != 0 else None
        if cls is errors.ProbeError:
            err: ClocheError = errors.ProbeError(message, point=env.get("point"),
                                                 probe=env.get("probe"), rank=rank,
                                                 remote_traceback=tb)
        else:
            err = cls(message, rank=rank, remote_traceback=tb)
        if rank == 0 and own is not None:
            err.__cause__ = own
        return err

    # ----------------------------------------------------------------- running
    def _plans(self, probes: Mapping[str, Any] | None, grad_probes: Mapping[str, Any] | None
               ) -> tuple[dict, dict]:
        return _as_plan(probes, self.resolve), _as_plan(grad_probes, self.resolve)

    def run(self, inputs: Any, *, probes: Mapping[str, Any] | None = None,
            grad_probes: Mapping[str, Any] | None = None, save: str | None = None,
            backward: bool | Callable[..., torch.Tensor] | None = None,
            return_logits: bool = True, cancel: Any = None,
            micro_batches: int | None = None) -> RunResult:
        """Like :meth:`cloche.Model.run`. ``micro_batches`` > 1 splits a forward-only batch so
        ranks overlap (probes are then called once per micro-batch)."""
        ids, mask = encode_inputs(inputs, self.tokenizer)
        forward, backward_probes = self._plans(probes, grad_probes)
        if backward_probes and not backward:
            raise UsageError("gradient probes need a backward pass: pass backward=True or a loss"
                             " function")
        if backward is True and not self.causal:
            raise UsageError("backward=True means next-token loss, which a non-causal model"
                             " lacks; pass a callable that returns the scalar to backprop")
        if backward not in (None, True, False) and not callable(backward):
            raise UsageError(f"backward must be True, None or a callable, not {backward!r}")
        n = self.micro_batches if micro_batches is None else micro_batches
        if not isinstance(n, int) or n < 1:
            raise UsageError(f"micro_batches must be a positive int, not {n!r}")
        last = self.plan.last

        def receive_logits() -> torch.Tensor:
            return self._channel.recv(last, keys.final_logits(self._seq))

        after = receive_logits if return_logits else None
        result = self._command(
            "run", cancel=cancel, after=after, ids=ids, mask=mask, forward=forward,
            backward_probes=backward_probes, save=save or DEFAULT_CONTEXT, backward=backward,
            return_logits=return_logits, micro_batches=n)
        values, logits = result if after is not None else (result, None)
        loss = values[last]["loss"]
        return RunResult(None if logits is None else logits.cpu(), loss, ids, mask)

    def generate(self, prompt: Any, max_new_tokens: int = 20, *,
                 probes: Mapping[str, Any] | None = None, save: str | None = None,
                 temperature: float = 0.0, seed: int | None = None, cancel: Any = None
                 ) -> GenerateResult:
        if not self.causal:
            raise UsageError("generate needs a causal language model")
        options = generation_options(self.tokenizer, max_new_tokens, temperature)
        ids, mask = encode_inputs(prompt, self.tokenizer, padding_side="left")
        forward, _ = self._plans(probes, None)
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        values = self._command("generate", cancel=cancel, ids=ids, mask=mask, forward=forward,
                               save=save or DEFAULT_CONTEXT, options=options, seed=seed)
        return generate_result(self.tokenizer, values[0], ids.shape[1])

    def run_dataset(self, dataset: Any, *, probes: Mapping[str, Any] | None = None,
                    save: str | None = None, batch_size: int = 8, limit: int | None = None,
                    progress: bool | Callable[[dict[str, Any]], None] | None = None,
                    cancel: Any = None, micro_batches: int | None = None) -> dict[str, Any]:
        """Like :meth:`cloche.Model.run_dataset`; batches stream through the pipeline, so ranks
        work on consecutive batches at the same time."""
        from cloche.runtime.datasets import as_dataset

        ds = as_dataset(dataset, self.tokenizer)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch_size must be a positive int, not {batch_size!r}")
        forward, _ = self._plans(probes, None)
        name = save or DEFAULT_CONTEXT
        n = self.micro_batches if micro_batches is None else micro_batches
        values = self._command("dataset", cancel=cancel,
                               local={"progress": progress, "cancel": cancel},
                               dataset=ds, batch_size=batch_size, limit=limit, forward=forward,
                               save=name, micro_batches=n)
        totals = values[0]
        handle = self.save_context(name)
        reducers = handle.reducers()
        return {"reducers": {r: red.result() for r, red in reducers.items()},
                "state": handle.state, **totals, "dataset": ds.name,
                "fingerprint": ds.fingerprint()}

    def call(self, fn: Callable[..., Any], *args: Any, rank: int | str | None = None,
             **kwargs: Any) -> Any:
        """``fn(model, *args, **kwargs)`` next to the data.

        ``rank=None``: on rank 0 with this (whole, sharded) model. ``rank=k``: on rank ``k``
        with its shard (a local ``cloche.Model`` holding only its blocks and save contexts).
        ``rank="all"``: on every rank with its shard; returns ``{rank: result}``.
        """
        if not callable(fn):
            raise UsageError(f"call needs a callable, not {fn!r}")
        if rank is None:
            return self._call_here(fn, args, kwargs)
        if rank == "all":
            targets = list(range(self.world_size))
        elif isinstance(rank, int) and not isinstance(rank, bool) and 0 <= rank < self.world_size:
            targets = [rank]
        else:
            raise UsageError(f"rank must be None, 'all' or an int in [0, {self.world_size}),"
                             f" not {rank!r}")
        values = self._command("call", fn=_shippable(fn), args=args, kwargs=kwargs,
                               targets=targets)
        if rank == "all":
            return dict(enumerate(values))
        return values[rank]

    def _call_here(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        try:
            return fn(self, *args, **kwargs)
        except ClocheError:
            raise
        except Exception as exc:
            name = getattr(fn, "__qualname__", repr(fn))
            raise errors.ProbeError(f"function {name} raised {type(exc).__name__}: {exc}",
                                    probe=name) from exc

    # ----------------------------------------------------------------- save contexts
    def save_context(self, name: str = DEFAULT_CONTEXT) -> DistSaveContextHandle:
        if not isinstance(name, str) or not name:
            raise UsageError(f"save context names are non-empty strings, not {name!r}")
        return DistSaveContextHandle(self, name)

    def save_contexts(self) -> list[str]:
        names: set[str] = set()
        for found in self._ctx("", "names"):
            names.update(found)
        return sorted(names)

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
                raise UsageError("the distributed model was closed")
            payload = cloudpickle.dumps((op, kwargs))
            store = self._light_channel.control.store
            values: list[Any] = [None] * self.world_size
            sent = []
            try:
                for r in targets:
                    if r == 0:
                        continue
                    self._light_seq[r] += 1
                    store.set(f"light/{r}/{self._light_seq[r]}", payload)
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

    # ----------------------------------------------------------------- weights and tokens
    def param_names(self, canonical: bool = True) -> list[str]:
        raw = [n for n, _ in self._stage_meta_params()]
        if not canonical:
            return raw
        present = set(raw)
        return [n for n in self._weights if self._weights[n][0] in present] + raw

    def _stage_meta_params(self) -> list[tuple[str, Any]]:
        if not hasattr(self, "_meta_params"):
            from cloche.sharding.shard import skeleton

            sk = skeleton(self.path)
            self._meta_params = [(n, tuple(p.shape)) for n, p in
                                 sk.meta_model.named_parameters(remove_duplicate=False)]
        return self._meta_params

    def param(self, name: str, *, grad: bool = False) -> torch.Tensor:
        """A weight (or its gradient) from the rank that holds it."""
        if not isinstance(name, str):
            raise UsageError(f"weight names are strings, not {name!r}")
        raw = self._weights[name][0] if name in self._weights else name
        names = {n for n, _ in self._stage_meta_params()}
        if raw not in names:
            if name in self._weights:
                raise UnknownProbePoint(f"this model has no weight {name!r} ({raw} is absent)")
            close = [n for n in self._weights if n.endswith(name.split(".")[-1])][:5]
            raise UnknownProbePoint(f"unknown weight {name!r}"
                                    + (f"; did you mean {close}?" if close else ""))
        owner = self._stage.ownership.param_owner(raw)
        if owner == 0:
            return self._local.param(name, grad=grad)
        return self._light("param", {"name": name, "grad": grad, "target": owner}, [owner])[owner]

    def tokenize(self, text: str | list[str]) -> torch.Tensor:
        return self._local.tokenize(text)

    def decode(self, ids: Any) -> str:
        return self._local.decode(ids)

    def to_str_tokens(self, ids: Any) -> list[str]:
        return self._local.to_str_tokens(ids)

    # ----------------------------------------------------------------- lifecycle
    def ping(self) -> list[int]:
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

    def __enter__(self) -> DistributedModel:  # noqa: PYI034 - py3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DistributedModel({self.name!r}, {self.adapter.family},"
                f" layers={self.n_layers}, world_size={self.world_size},"
                f" layers_per_rank={self.plan.layers_per_rank()})")
