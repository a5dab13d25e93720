"""Train a sparse dictionary where its point lives, and measure it.

:func:`train_dictionary` runs the model over a dataset with one probe at the point: the probe
(a :class:`TrainStep`) hands each batch's activations straight to an optimizer in the process
that runs that point — this process, the server, or the rank of a sharded model that owns the
point — so activations never cross the wire. The dictionary being trained lives in that process
(``_LIVE``, by job id) between batches and epochs; at the end one ``model.call`` on the owning
rank fetches its weights. Progress and cancellation are ``run_dataset``'s. With a
``checkpoint`` folder (on the machine of the owning rank) the trainer writes its state there
each time it trains on its buffer of tokens and when stopped, and a later call with the same folder
resumes where it stopped (batches already trained on are skipped).

TopK dictionaries (Gao et al. 2024) train with the MSE and the AuxK loss that revives dead
latents; standard (ReLU) ones with the MSE plus an L1 penalty weighted by decoder norms.
Decoder rows are kept at unit norm. :func:`evaluate_dictionary` reports what the issue asks of a
dictionary: reconstruction MSE, fraction of variance explained, L0, dead-feature fraction, and
the next-token loss with the reconstruction spliced in, against the clean model and a
zero-ablation of the point (``ce_recovered`` = the share of that gap the splice closes).

This module drives the model only through its public methods (``run_dataset``, ``call``,
``attach_dictionary``), which it receives.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cloche.dictionaries.format import DictionaryConfig
from cloche.dictionaries.modules import SparseDictionary
from cloche.errors import ClocheError, UsageError
from cloche.probes import Mean, Variance

__all__ = ["TrainStep", "TrainingResult", "TrainingSpec", "evaluate_dictionary",
           "train_dictionary"]

#: the dictionaries being trained in this process, by job id
_LIVE: dict[str, _Trainer] = {}
_LIVE_LOCK = threading.Lock()
_STATE_FILE = "trainer.pt"
_SAELENS_DIR = "dictionary"


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """Everything the trainer needs, as plain data (it travels with the probe)."""

    job: str
    config: dict[str, Any]
    lr: float = 1e-3
    l1_coefficient: float = 1e-3
    aux_coefficient: float = 1 / 32
    dead_after_tokens: int = 200_000
    checkpoint: str | None = None
    #: tokens gathered (and shuffled) before they are trained on, in steps of ``step_tokens``,
    #: each ``reuse`` times: consecutive tokens of a text are alike, and forward passes cost
    buffer_tokens: int = 16384
    step_tokens: int = 1024
    reuse: int = 1
    seed: int = 0
    epoch: int = 0


class _Trainer:
    """A dictionary, its optimizer and its bookkeeping, in the process that runs the point."""

    def __init__(self, spec: TrainingSpec, device: torch.device) -> None:
        self.spec = spec
        config = DictionaryConfig.from_cfg(spec.config)
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        try:
            self.module = SparseDictionary(config.replace(dtype="float32")).to(device)
        finally:
            torch.random.set_rng_state(generator_state)
        with torch.no_grad():  # unit-norm decoder rows, the encoder their transpose
            self.module.W_dec.div_(self.module.W_dec.norm(dim=-1, keepdim=True))
            self.module.W_enc.copy_(self.module.W_dec.T)
        self.optimizer = torch.optim.Adam(self.module.parameters(), lr=spec.lr)
        self.step_count = 0
        self.tokens = 0
        self.done = 0  # examples trained on, over all epochs (epoch * size + id + 1)
        self.scale = 1.0  # the activations' variance per token, which the loss is divided by
        self.since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=device)
        self.history: list[dict[str, float]] = []
        self.lock = threading.Lock()
        self.buffer: list[torch.Tensor] = []
        self.buffered = 0
        self.buffer_position = 0
        self.shuffle = torch.Generator(device="cpu").manual_seed(spec.seed)
        if spec.checkpoint is not None and (Path(spec.checkpoint) / _STATE_FILE).is_file():
            self._load(Path(spec.checkpoint) / _STATE_FILE, device)

    # ----------------------------------------------------------------- checkpoints
    def _load(self, path: Path, device: torch.device) -> None:
        state = torch.load(path, map_location=device, weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.tokens, self.done = state["step"], state["tokens"], state["done"]
        self.scale = state["scale"]
        self.since_fired = state["since_fired"].to(device)
        self.history = [dict(zip(("step", "mse", "fve"), row, strict=True))
                        for row in state["history"].tolist()]

    def save(self) -> None:
        if self.spec.checkpoint is None:
            return
        folder = Path(self.spec.checkpoint)
        folder.mkdir(parents=True, exist_ok=True)
        history = torch.tensor([[h["step"], h["mse"], h["fve"]] for h in self.history],
                               dtype=torch.float64).reshape(-1, 3)
        state = {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step_count, "tokens": self.tokens, "done": self.done,
                 "scale": self.scale, "since_fired": self.since_fired.cpu(),
                 "history": history}
        partial = folder / (_STATE_FILE + ".partial")
        torch.save(state, partial)
        os.replace(partial, folder / _STATE_FILE)  # a crash never leaves half a checkpoint
        self.module.save(folder / _SAELENS_DIR)

    # ----------------------------------------------------------------- the buffer
    def add(self, x: torch.Tensor, position: int) -> None:
        """Gather tokens ``x`` (n, d_in) of the examples up to ``position``; train when the
        buffer is full."""
        self.buffer.append(x.to(torch.float32).clone())
        self.buffered += x.shape[0]
        self.buffer_position = max(self.buffer_position, position)
        if self.buffered >= self.spec.buffer_tokens:
            self.flush()

    def flush(self) -> None:
        """Train on the gathered tokens, shuffled, and empty the buffer."""
        if not self.buffer:
            return
        tokens = torch.cat(self.buffer)
        self.buffer, self.buffered = [], 0
        step = self.spec.step_tokens
        for _ in range(self.spec.reuse):
            order = torch.randperm(tokens.shape[0], generator=self.shuffle).to(tokens.device)
            for start in range(0, tokens.shape[0], step):
                chunk = tokens[order[start:start + step]]
                if chunk.shape[0] >= max(1, step // 4):  # a ragged tail is too noisy a step
                    self.train_on(chunk)
        self.done = max(self.done, self.buffer_position)
        if self.spec.checkpoint is not None:
            self.save()

    # ----------------------------------------------------------------- one step
    def train_on(self, x: torch.Tensor) -> None:
        """One optimizer step on tokens ``x`` (n, d_in)."""
        module = self.module
        config = module.config
        x = x.to(torch.float32)
        if self.step_count == 0:  # start the decoder bias at the data's mean
            with torch.no_grad():
                mean = x.mean(dim=0)
                module.b_dec.copy_(mean)
                self.scale = float((x - mean).pow(2).sum(-1).mean()) or 1.0
        with torch.enable_grad():
            pre = module.pre_activation(x)
            features = module.activate(pre)
            reconstruction = features @ module.W_dec + module.b_dec
            residual = x - reconstruction
            mse = residual.pow(2).sum(-1).mean()
            loss = mse / self.scale
            if config.architecture == "topk":
                loss = loss + self.spec.aux_coefficient * self._aux_loss(pre, residual)
            else:
                l1 = (features * module.W_dec.norm(dim=-1)).sum(-1).mean()
                loss = loss + self.spec.l1_coefficient * l1 / math.sqrt(self.scale)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with torch.no_grad():
            w_dec, grad = module.W_dec, module.W_dec.grad
            if grad is not None:  # no gradient along the rows: they stay at unit norm
                grad.sub_((grad * w_dec).sum(-1, keepdim=True) * w_dec)
            self.optimizer.step()
            w_dec.div_(w_dec.norm(dim=-1, keepdim=True))
            fired = (features > 0).any(dim=0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            variance = float((x - x.mean(0)).pow(2).sum(-1).mean())
        self.step_count += 1
        self.tokens += x.shape[0]
        error = float(mse.detach())
        self.history.append({"step": float(self.step_count), "mse": error,
                             "fve": 1.0 - error / variance if variance else 0.0})

    def _aux_loss(self, pre: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """AuxK: the dead latents' top activations reconstruct what the live ones missed."""
        dead = self.since_fired >= self.spec.dead_after_tokens
        n_dead = int(dead.sum())
        if n_dead == 0:
            return pre.new_zeros(())
        k_aux = min(pre.shape[-1] // 2, n_dead, self.module.d_in // 2 or 1)
        masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
        top = masked.topk(k_aux, dim=-1)
        aux = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        predicted = aux @ self.module.W_dec
        return (predicted - residual.detach()).pow(2).sum(-1).mean() / self.scale


def _trainer(spec: TrainingSpec, device: torch.device) -> _Trainer:
    with _LIVE_LOCK:
        trainer = _LIVE.get(spec.job)
        if trainer is None:
            trainer = _LIVE[spec.job] = _Trainer(spec, device)
        return trainer


class TrainStep:
    """The probe that trains: each batch's tokens (padding left out) go to the optimizer."""

    def __init__(self, spec: TrainingSpec, dataset_size: int) -> None:
        self.spec = spec
        self.dataset_size = dataset_size

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        trainer = _trainer(self.spec, x.device)
        ids = ctx.example_ids
        base = self.spec.epoch * self.dataset_size
        position = base + (int(ids.max()) + 1 if ids is not None else 0)
        if position <= trainer.done:
            return None  # trained on before a resume
        mask = ctx.attention_mask
        if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
            tokens = x[mask.bool()]
        else:
            tokens = x.reshape(-1, x.shape[-1])
        with trainer.lock:
            trainer.add(tokens.detach(), position)
        return None


def _finish(model: Any, job: str, keep: bool) -> dict[str, Any]:
    """On the owning rank: the trained weights and history (and the trainer dropped)."""
    with _LIVE_LOCK:
        trainer = _LIVE.get(job) if keep else _LIVE.pop(job, None)
    if trainer is None:
        raise ClocheError(f"no dictionary is being trained under job {job!r} on this rank")
    with trainer.lock:
        trainer.flush()
        trainer.save()
    return {"weights": trainer.module.weights(), "config": trainer.module.config.to_cfg(),
            "steps": trainer.step_count, "tokens": trainer.tokens,
            "history": list(trainer.history)}


def _stop(model: Any, job: str) -> None:
    """On the owning rank, after a failure or cancel: checkpoint what there is and let go."""
    with _LIVE_LOCK:
        trainer = _LIVE.pop(job, None)
    if trainer is not None:
        with trainer.lock:  # what was gathered but not trained on is trained on after resuming
            trainer.save()


@dataclass
class TrainingResult:
    """What :func:`train_dictionary` returns."""

    dictionary: SparseDictionary
    steps: int
    tokens: int
    history: list[dict[str, float]] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    checkpoint: str | None = None


def _size(dataset: Any) -> int:
    try:
        return len(dataset)
    except TypeError:
        return 0


def train_dictionary(model: Any, point: str, dataset: Any, *, kind: str = "topk",
                     d_dict: int, k: int | None = None, epochs: int = 1, batch_size: int = 8,
                     limit: int | None = None, lr: float = 1e-3, l1_coefficient: float = 1e-3,
                     dead_after_tokens: int = 200_000, checkpoint: str | None = None,
                     buffer_tokens: int = 16384, step_tokens: int = 1024, reuse: int = 1,
                     seed: int = 0,
                     heldout: Any = None, heldout_limit: int | None = None,
                     save_to: str | os.PathLike[str] | None = None,
                     progress: bool | Callable[[dict[str, Any]], None] | None = True,
                     cancel: Any = None) -> TrainingResult:
    """Train a ``kind`` dictionary (``"topk"`` with ``k``, or ``"standard"``) of ``d_dict``
    features on the activations at ``point`` over ``dataset``, where the point lives.

    ``dataset`` is what ``run_dataset`` takes (``"default:train"``, a ``cloche.data.Dataset``,
    texts); ``epochs`` passes over its first ``limit`` examples. Tokens are gathered in a
    buffer of ``buffer_tokens`` where the point lives, shuffled, and trained on in steps of
    ``step_tokens``, each ``reuse`` times. ``checkpoint``: a folder on the machine of the
    point's rank, written each time the buffer is trained on; training resumes from it when it
    holds a checkpoint. With
    ``heldout`` the result carries :func:`evaluate_dictionary`'s metrics on it; ``save_to``
    writes the dictionary here as a SAELens folder.
    """
    if kind not in ("topk", "standard"):
        raise UsageError(f"train_dictionary trains 'topk' or 'standard' dictionaries, not"
                         f" {kind!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"epochs must be a positive int, not {epochs!r}")
    point = model.resolve(point)
    owner = model.owner_of(point)
    d_in = _width(model, point)
    config = DictionaryConfig(d_in=d_in, d_sae=d_dict, architecture=kind,
                              k=k if kind == "topk" else None, hook_name=point,
                              model_name=model.name, prepend_bos=_adds_bos(model))
    job = f"checkpoint:{checkpoint}" if checkpoint else f"job:{uuid.uuid4().hex}"
    spec = TrainingSpec(job=job, config=config.to_cfg(), lr=lr, l1_coefficient=l1_coefficient,
                        dead_after_tokens=dead_after_tokens, checkpoint=checkpoint,
                        buffer_tokens=buffer_tokens, step_tokens=step_tokens, reuse=reuse,
                        seed=seed)
    size = limit if limit is not None else _size(dataset)
    if epochs > 1 and not size:
        raise UsageError("several epochs over a dataset named on the server need limit=...")
    try:
        for epoch in range(epochs):
            model.run_dataset(dataset, probes={point: TrainStep(replace(spec, epoch=epoch),
                                                                max(size, 1))},
                              save=f"__train__/{job}", batch_size=batch_size, limit=limit,
                              progress=progress, cancel=cancel)
        out = model.call(_finish, job, False, rank=owner)
    except BaseException:
        # checkpoint what was trained; a lost connection must not hide the original error
        with contextlib.suppress(ClocheError):
            model.call(_stop, job, rank=owner)
        raise
    finally:
        model.save_context(f"__train__/{job}").clear()
    dictionary = SparseDictionary(DictionaryConfig.from_cfg(out["config"]), out["weights"])
    if save_to is not None:
        dictionary.save(save_to)
    metrics = None
    if heldout is not None:
        metrics = evaluate_dictionary(model, dictionary, heldout, point=point,
                                      batch_size=batch_size, limit=heldout_limit,
                                      progress=progress, cancel=cancel)
    return TrainingResult(dictionary=dictionary, steps=out["steps"], tokens=out["tokens"],
                          history=out["history"], metrics=metrics, checkpoint=checkpoint)


def _width(model: Any, point: str) -> int:
    for p in model.probe_points():
        if p.name == point and p.shape:
            width = p.shape[-1]
            if isinstance(width, int):
                return width
    raise UsageError(f"cannot tell the width of {point!r}: a dictionary trains on a point of"
                     " shape (batch, seq, width)")


def _adds_bos(model: Any) -> bool | None:
    if model.prepend_bos is not None:
        return bool(model.prepend_bos)
    tokenizer = model.tokenizer
    if tokenizer is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == getattr(tokenizer, "bos_token_id", None)


# --------------------------------------------------------------------------- evaluation


def _next_token_loss(ctx: Any, logits: torch.Tensor) -> None:
    """Per-token next-token cross-entropy over real tokens, into the Mean reducer ``ce``."""
    tokens = ctx.tokens
    mask = ctx.attention_mask
    losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none")
    valid = (mask[:, 1:] * mask[:, :-1]).flatten().bool()
    ctx.reduce("ce", losses[valid].unsqueeze(-1), Mean())


def _zero(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def _measure_error(ctx: Any, error: torch.Tensor) -> None:
    ctx.reduce("sse", error.pow(2).sum(-1, keepdim=True), Mean())


def _measure_input(ctx: Any, x: torch.Tensor) -> None:
    ctx.reduce("x", x, Variance())


def _measure_features(ctx: Any, features: torch.Tensor) -> None:
    fired = (features > 0).to(torch.float32)
    ctx.reduce("fired", fired, Mean())
    ctx.reduce("l0", fired.sum(-1, keepdim=True), Mean())


def evaluate_dictionary(model: Any, dictionary: Any, dataset: Any, *, point: str | None = None,
                        batch_size: int = 8, limit: int | None = None,
                        progress: bool | Callable[[dict[str, Any]], None] | None = True,
                        cancel: Any = None) -> dict[str, float]:
    """Reconstruction MSE, fraction of variance explained, L0, dead-feature fraction and the
    next-token loss clean / with the reconstruction spliced in / with the point zeroed.

    ``dictionary``: the name of an attached dictionary, or one to attach for the measurement
    (at ``point``, or its ``hook_name``) and detach after.
    """
    if isinstance(dictionary, str):
        name = dictionary
        attached = False
    else:
        name = f"eval-{uuid.uuid4().hex[:8]}"
        model.attach_dictionary(name, dictionary, point=point)
        attached = True
    try:
        base = model.dictionaries()[name]["point"]
        save = f"__eval__/{name}"

        def run(probes: dict[str, Any]) -> dict[str, Any]:
            try:
                out = model.run_dataset(dataset, probes={**probes, "logits": _next_token_loss},
                                        save=save, batch_size=batch_size, limit=limit,
                                        progress=progress, cancel=cancel)
                return dict(out["reducers"])
            finally:
                model.save_context(save).clear()

        clean = run({base: _measure_input, f"dict:{name}:error": _measure_error,
                     f"dict:{name}:features": _measure_features})
        spliced = run({f"dict:{name}:error": _zero})
        ablated = run({base: _zero})
    finally:
        if attached:
            model.detach_dictionary(name)
    variance = float(clean["x"]["var"].sum())
    mse = float(clean["sse"]["mean"][0])
    ce_clean = float(clean["ce"]["mean"][0])
    ce_spliced = float(spliced["ce"]["mean"][0])
    ce_zero = float(ablated["ce"]["mean"][0])
    gap = ce_zero - ce_clean
    return {"mse": mse, "fve": 1.0 - mse / variance if variance else float("nan"),
            "l0": float(clean["l0"]["mean"][0]),
            "dead_fraction": float((clean["fired"]["mean"] == 0).double().mean()),
            "ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablation": ce_zero,
            "ce_recovered": (ce_zero - ce_spliced) / gap if gap else float("nan"),
            "tokens": float(clean["ce"]["count"])}
