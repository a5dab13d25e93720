"""Train a sparse dictionary or a transcoder where its points live, and measure it.

:func:`train_dictionary` runs the model over a dataset with a probe at the point (and, for a
transcoder, one at the ``target`` point it learns to write): the probe (a :class:`TrainStep`)
hands each batch's activations straight to an optimizer in the process that runs that point —
this process, the server, or the rank of a sharded model that owns the point — so activations
never cross the wire. The trainer lives in that process between batches and epochs (kept by job
id in :mod:`cloche.learned.live`, whose :func:`~cloche.learned.live.train` is the loop every
learned thing trains by); at the end one ``model.call`` on the owning rank fetches its weights.
Progress and cancellation are ``run_dataset``'s. With a ``checkpoint`` folder (on the machine of
the owning rank) the trainer writes its state there each time it trains on its buffer of tokens
and when stopped, and a later call with the same folder resumes where it stopped (batches
already trained on are skipped).

TopK dictionaries (Gao et al. 2024) train with the MSE and the AuxK loss that revives dead
latents; standard (ReLU) ones with the MSE plus an L1 penalty weighted by decoder norms;
JumpReLU ones (Rajamanoharan et al. 2024) with the MSE plus an L0 penalty, the thresholds
learning through a straight-through estimator (:mod:`cloche.dictionaries.jumprelu`).
Transcoders (``target=``) learn to write the target point from the input point: ``standard``
and ``jumprelu`` kinds, as SAELens' ``transcoder`` and ``jumprelu_transcoder`` (``skip=True``:
with a trained ``W_skip``). JumpReLU dictionaries and transcoders train on activations scaled to
unit variance per dimension (a transcoder's input and output each by its own), so thresholds
and widths are in those units and an MLP's small output is not dwarfed by its input; the scales
are folded into the weights that come out, which read and write raw activations, as SAELens'
files do.
Decoder rows are kept at unit norm. :func:`evaluate_dictionary` reports what the issue asks of a
dictionary: reconstruction MSE, fraction of variance explained, L0, dead-feature fraction, and
the next-token loss with the reconstruction spliced in, against the clean model and a
zero-ablation of the point (``ce_recovered`` = the share of that gap the splice closes).

This module drives the model only through its public methods (``run_dataset``, ``call``,
``attach_dictionary``), which it receives.
"""

from __future__ import annotations

import math
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from cloche.dictionaries.format import DictionaryConfig
from cloche.dictionaries.jumprelu import JumpReLU, Step
from cloche.dictionaries.modules import SparseDictionary
from cloche.errors import UsageError
from cloche.learned import live
from cloche.probes import Mean, Variance

__all__ = ["TrainStep", "TrainingResult", "TrainingSpec", "evaluate_dictionary",
           "train_dictionary"]

_STATE_FILE = "trainer.pt"
_SAELENS_DIR = "dictionary"
_KINDS = ("topk", "standard", "jumprelu")


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """Everything the trainer needs, as plain data (it travels with the probe)."""

    job: str
    config: dict[str, Any]
    lr: float = 1e-3
    l1_coefficient: float = 1e-3
    aux_coefficient: float = 1 / 32
    #: JumpReLU: the L0 penalty's weight (against the MSE as a share of the variance), the
    #: estimator's kernel width and the thresholds' start, in units of the activations' std
    l0_coefficient: float = 1e-3
    bandwidth: float = 0.05
    init_threshold: float = 0.01
    #: JumpReLU: the weight of the pre-activation loss on dead latents (0: none)
    pre_act_coefficient: float = 0.0
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
        module = self.module
        with torch.no_grad():  # unit-norm decoder rows, the encoder their transpose
            module.W_dec.div_(module.W_dec.norm(dim=-1, keepdim=True))
            if config.transcoder:  # unit-norm random encoder directions
                module.W_enc.div_(module.W_enc.norm(dim=0, keepdim=True))
            else:
                module.W_enc.copy_(module.W_dec.T)
            if config.activation == "jumprelu":
                module.threshold.fill_(spec.init_threshold)
        self.optimizer = torch.optim.Adam(module.parameters(), lr=spec.lr)
        self.step_count = 0
        self.tokens = 0
        self.done = 0  # examples trained on, over all epochs (epoch * size + id + 1)
        self.scale = 1.0  # the target's variance per token, which the loss is divided by
        #: what inputs and targets are divided by while training (JumpReLU and transcoders:
        #: their std per dimension, 1 otherwise), folded into the weights that come out
        self.unit_in = self.unit_out = 1.0
        self.since_fired = torch.zeros(config.d_sae, dtype=torch.long, device=device)
        self.history: list[dict[str, float]] = []
        self.lock = threading.Lock()
        self.buffer: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.buffered = 0
        self.buffer_position = 0
        #: a transcoder's inputs waiting for their batch's target, by example ids
        self.pending: dict[tuple[int, ...], torch.Tensor] = {}
        self.pending_order: deque[torch.Tensor] = deque()
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
        self.unit_in = state.get("unit_in", 1.0)
        self.unit_out = state.get("unit_out", 1.0)
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
                 "scale": self.scale, "unit_in": self.unit_in, "unit_out": self.unit_out,
                 "since_fired": self.since_fired.cpu(), "history": history}
        partial = folder / (_STATE_FILE + ".partial")
        torch.save(state, partial)
        os.replace(partial, folder / _STATE_FILE)  # a crash never leaves half a checkpoint
        self.dictionary().save(folder / _SAELENS_DIR)

    def dictionary(self) -> SparseDictionary:
        """The dictionary trained so far, reading and writing raw activations."""
        weights = {name: p.detach().clone() for name, p in self.module.named_parameters()}
        if (self.unit_in, self.unit_out) != (1.0, 1.0):
            weights["W_enc"] /= self.unit_in
            weights["W_dec"] *= self.unit_out
            weights["b_dec"] *= self.unit_out
            if "W_skip" in weights:
                weights["W_skip"] *= self.unit_out / self.unit_in
        return SparseDictionary(self.module.config,
                                {name: w.cpu() for name, w in weights.items()})

    # ----------------------------------------------------------------- the buffer
    def add(self, x: torch.Tensor, y: torch.Tensor | None, position: int) -> None:
        """Gather tokens ``x`` (n, d_in) — and a transcoder's targets ``y`` (n, d_out) — of the
        examples up to ``position``; train when the buffer is full."""
        self.buffer.append((x.to(torch.float32).clone(),
                            None if y is None else y.to(torch.float32).clone()))
        self.buffered += x.shape[0]
        self.buffer_position = max(self.buffer_position, position)
        if self.buffered >= self.spec.buffer_tokens:
            self.flush()

    def flush(self) -> None:
        """Train on the gathered tokens, shuffled, and empty the buffer."""
        if not self.buffer:
            return
        inputs = torch.cat([x for x, _ in self.buffer])
        targets = (None if self.buffer[0][1] is None
                   else torch.cat([y for _, y in self.buffer if y is not None]))
        self.buffer, self.buffered = [], 0
        step = self.spec.step_tokens
        for _ in range(self.spec.reuse):
            order = torch.randperm(inputs.shape[0], generator=self.shuffle).to(inputs.device)
            for start in range(0, inputs.shape[0], step):
                rows = order[start:start + step]
                if rows.shape[0] >= max(1, step // 4):  # a ragged tail is too noisy a step
                    self.train_on(inputs[rows], None if targets is None else targets[rows])
        self.done = max(self.done, self.buffer_position)
        if self.spec.checkpoint is not None:
            self.save()

    # ----------------------------------------------------------------- one step
    def _start(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Before the first step: the units, the decoder bias at the target's mean, the
        target's variance (the loss's unit)."""
        config = self.module.config
        if config.activation == "jumprelu" or config.transcoder:
            self.unit_in = _std_per_dim(x)
            self.unit_out = self.unit_in if y is x else _std_per_dim(y)
        y = y / self.unit_out
        mean = y.mean(dim=0)
        self.module.b_dec.copy_(mean)
        self.scale = float((y - mean).pow(2).sum(-1).mean()) or 1.0

    def train_on(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One optimizer step on tokens ``x`` (n, d_in) (and a transcoder's targets ``y``)."""
        module = self.module
        config = module.config
        x = x.to(torch.float32)
        y = x if y is None else y.to(torch.float32)
        if self.step_count == 0:
            with torch.no_grad():
                self._start(x, y)
        x, y = x / self.unit_in, y / self.unit_out
        with torch.enable_grad():
            pre = module.pre_activation(x)
            if config.activation == "jumprelu":
                features = JumpReLU.apply(pre, module.threshold, self.spec.bandwidth)
            else:
                features = module.activate(pre)
            reconstruction = features @ module.W_dec + module.b_dec
            if config.skip:
                reconstruction = reconstruction + x @ module.W_skip.T
            residual = y - reconstruction
            mse = residual.pow(2).sum(-1).mean()
            loss = mse / self.scale
            if config.activation == "topk":
                loss = loss + self.spec.aux_coefficient * self._aux_loss(pre, residual)
            elif config.activation == "jumprelu":
                l0 = Step.apply(pre, module.threshold, self.spec.bandwidth).sum(-1).mean()
                loss = loss + self.spec.l0_coefficient * l0
                if self.spec.pre_act_coefficient:
                    loss = loss + self.spec.pre_act_coefficient * self._pre_act_loss(pre)
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
            if config.activation == "jumprelu":  # below zero the gate lets negatives through
                module.threshold.clamp_(min=0.0)
            fired = (features > 0).any(dim=0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            variance = float((y - y.mean(0)).pow(2).sum(-1).mean())
        self.step_count += 1
        self.tokens += x.shape[0]
        error = float(mse.detach())
        self.history.append({"step": float(self.step_count),
                             "mse": error * self.unit_out ** 2,
                             "fve": 1.0 - error / variance if variance else 0.0})

    def _pre_act_loss(self, pre: torch.Tensor) -> torch.Tensor:
        """JumpReLU's dead latents: their pre-activations pulled up to their thresholds
        (Anthropic's pre-activation loss, on dead latents only, as SAELens does it)."""
        dead = self.since_fired >= self.spec.dead_after_tokens
        if not bool(dead.any()):
            return pre.new_zeros(())
        module = self.module
        gap = torch.relu(module.threshold - pre) * dead * module.W_dec.norm(dim=-1)
        return gap.sum(-1).mean()

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

    # ----------------------------------------------------------------- a transcoder's pairs
    def hold_input(self, key: tuple[int, ...] | None, x: torch.Tensor) -> None:
        """A transcoder's input tokens, until its batch reaches the target point."""
        if key is None:
            self.pending_order.append(x)
        else:
            self.pending[key] = x

    def take_input(self, key: tuple[int, ...] | None) -> torch.Tensor:
        x = self.pending.pop(key, None) if key is not None else (
            self.pending_order.popleft() if self.pending_order else None)
        if x is None:
            raise UsageError("a transcoder's target point ran before its input point: the input"
                             " point must come first in the forward pass")
        return x


def _std_per_dim(x: torch.Tensor) -> float:
    """The root-mean-square spread of ``x`` per dimension (its centred norm / sqrt(width))."""
    spread = float((x - x.mean(0)).pow(2).sum(-1).mean())
    return math.sqrt(spread / x.shape[-1]) or 1.0


class TrainStep:
    """The probe that trains: each batch's tokens (padding left out) go to the optimizer.

    ``role``: ``"both"`` for a sparse autoencoder (its point is input and target),
    ``"input"`` / ``"target"`` for a transcoder's two points.
    """

    def __init__(self, spec: TrainingSpec, dataset_size: int, role: str = "both") -> None:
        self.spec = spec
        self.dataset_size = dataset_size
        self.role = role

    def __call__(self, ctx: Any, x: torch.Tensor) -> None:
        spec = self.spec
        trainer = live.get_or_create(spec.job, lambda: _Trainer(spec, x.device))
        ids = ctx.example_ids
        base = spec.epoch * self.dataset_size
        position = base + (int(ids.max()) + 1 if ids is not None else 0)
        if position <= trainer.done:
            return None  # trained on before a resume
        mask = ctx.attention_mask
        if mask is not None and tuple(x.shape[:2]) == tuple(mask.shape):
            tokens = x[mask.bool()]
        else:
            tokens = x.reshape(-1, x.shape[-1])
        key = None if ids is None else tuple(int(i) for i in ids)
        with trainer.lock:
            if self.role == "input":
                trainer.hold_input(key, tokens.detach())
            elif self.role == "target":
                trainer.add(trainer.take_input(key), tokens.detach(), position)
            else:
                trainer.add(tokens.detach(), None, position)
        return None


def _finish(model: Any, job: str) -> dict[str, Any]:
    """On the owning rank: the trained weights and history (and the trainer dropped)."""
    trainer = live.pop(job)
    with trainer.lock:
        trainer.flush()
        trainer.save()
    dictionary = trainer.dictionary()
    return {"weights": dictionary.weights(), "config": dictionary.config.to_cfg(),
            "steps": trainer.step_count, "tokens": trainer.tokens,
            "history": list(trainer.history)}


def _stop(model: Any, job: str) -> None:
    """On the owning rank, after a failure or cancel: checkpoint what there is and let go."""
    trainer = live.pop(job, required=False)
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


def _architecture(kind: str, target: str | None, skip: bool) -> str:
    """The SAELens architecture of a ``kind`` dictionary (a transcoder when it has a target)."""
    if kind not in _KINDS:
        raise UsageError(f"train_dictionary trains kinds {_KINDS}, not {kind!r}")
    if target is None:
        if skip:
            raise UsageError("skip=True is for transcoders: give target=...")
        return kind
    if kind == "topk":
        raise UsageError("the SAELens format has no TopK transcoder: train a 'jumprelu' or"
                         " 'standard' one")
    prefix = "jumprelu_" if kind == "jumprelu" else ""
    return f"{prefix}skip_transcoder" if skip else f"{prefix}transcoder"


def train_dictionary(model: Any, point: str, dataset: Any, *, kind: str = "topk",
                     d_dict: int, k: int | None = None, target: str | None = None,
                     skip: bool = False, epochs: int = 1, batch_size: int = 8,
                     limit: int | None = None, lr: float = 1e-3, l1_coefficient: float = 1e-3,
                     l0_coefficient: float = 1e-3, bandwidth: float = 0.05,
                     init_threshold: float = 0.01, pre_act_coefficient: float = 0.0,
                     dead_after_tokens: int = 200_000, checkpoint: str | None = None,
                     buffer_tokens: int = 16384, step_tokens: int = 1024, reuse: int = 1,
                     seed: int = 0,
                     heldout: Any = None, heldout_limit: int | None = None,
                     save_to: str | os.PathLike[str] | None = None,
                     progress: bool | Callable[[dict[str, Any]], None] | None = True,
                     cancel: Any = None) -> TrainingResult:
    """Train a ``kind`` dictionary (``"topk"`` with ``k``, ``"standard"``, or ``"jumprelu"``)
    of ``d_dict`` features on the activations at ``point`` over ``dataset``, where the point
    lives; with ``target``, a transcoder that reads ``point`` and learns to write ``target``
    (e.g. ``layers.1.ln2`` → ``layers.1.mlp.out``; both on one rank), ``skip=True`` adding a
    trained linear skip connection.

    ``dataset`` is what ``run_dataset`` takes (``"default:train"``, a ``cloche.data.Dataset``,
    texts); ``epochs`` passes over its first ``limit`` examples. Tokens are gathered in a
    buffer of ``buffer_tokens`` where the point lives, shuffled, and trained on in steps of
    ``step_tokens``, each ``reuse`` times. Sparsity: ``k`` (TopK), ``l1_coefficient``
    (standard), ``l0_coefficient`` (JumpReLU, with the estimator's ``bandwidth`` and the
    thresholds' ``init_threshold`` in units of the activations' std per dimension;
    ``pre_act_coefficient`` > 0 pulls dead latents' pre-activations up to their thresholds).
    ``checkpoint``: a folder on the machine of the point's rank, written each time the buffer
    is trained on; training resumes from it when it holds a checkpoint. With ``heldout`` the
    result carries :func:`evaluate_dictionary`'s metrics on it; ``save_to`` writes the
    dictionary here as a SAELens folder.
    """
    architecture = _architecture(kind, target, skip)
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise UsageError(f"epochs must be a positive int, not {epochs!r}")
    for name, value, least in (("l0_coefficient", l0_coefficient, 0.0),
                               ("bandwidth", bandwidth, 1e-12),
                               ("init_threshold", init_threshold, 0.0),
                               ("pre_act_coefficient", pre_act_coefficient, 0.0)):
        if isinstance(value, bool) or not isinstance(value, int | float) or value < least:
            raise UsageError(f"{name} must be a number >= {least}, not {value!r}")
    point = model.resolve(point)
    owner = model.owner_of(point)
    d_in = _width(model, point)
    out: dict[str, Any] = {}
    if target is not None:
        target = model.resolve(target)
        if target == point:
            raise UsageError(f"a transcoder's target must differ from its point ({point!r})")
        if model.owner_of(target) != owner:
            raise UsageError(f"a transcoder's points {point!r} (rank {owner}) and {target!r}"
                             f" (rank {model.owner_of(target)}): both must be on one rank")
        out = {"d_out": _width(model, target), "hook_name_out": target,
               "apply_b_dec_to_input": False}
    config = DictionaryConfig(d_in=d_in, d_sae=d_dict, architecture=architecture,
                              k=k if kind == "topk" else None, hook_name=point,
                              model_name=model.name, prepend_bos=_adds_bos(model), **out)
    job = f"checkpoint:{checkpoint}" if checkpoint else f"job:{uuid.uuid4().hex}"
    spec = TrainingSpec(job=job, config=config.to_cfg(), lr=lr, l1_coefficient=l1_coefficient,
                        l0_coefficient=float(l0_coefficient), bandwidth=float(bandwidth),
                        init_threshold=float(init_threshold),
                        pre_act_coefficient=float(pre_act_coefficient),
                        dead_after_tokens=dead_after_tokens, checkpoint=checkpoint,
                        buffer_tokens=buffer_tokens, step_tokens=step_tokens, reuse=reuse,
                        seed=seed)
    size = limit if limit is not None else _size(dataset)
    if epochs > 1 and not size:
        raise UsageError("several epochs over a dataset named on the server need limit=...")

    def epoch_pass(epoch: int) -> Callable[[str], object]:
        step_spec, n = replace(spec, epoch=epoch), max(size, 1)
        probes = ({point: TrainStep(step_spec, n)} if target is None else
                  {point: TrainStep(step_spec, n, "input"),
                   target: TrainStep(step_spec, n, "target")})
        return lambda save: model.run_dataset(dataset, probes=probes, save=save,
                                              batch_size=batch_size, limit=limit,
                                              progress=progress, cancel=cancel)

    # a failure or cancel checkpoints what was trained (_stop) before it is raised
    trained = live.train(model, job, (epoch_pass(e) for e in range(epochs)), owner=owner,
                         finish=_finish, stop=_stop)
    dictionary = SparseDictionary(DictionaryConfig.from_cfg(trained["config"]),
                                  trained["weights"])
    if save_to is not None:
        dictionary.save(save_to)
    metrics = None
    if heldout is not None:
        metrics = evaluate_dictionary(model, dictionary, heldout, point=point,
                                      batch_size=batch_size, limit=heldout_limit,
                                      progress=progress, cancel=cancel)
    return TrainingResult(dictionary=dictionary, steps=trained["steps"],
                          tokens=trained["tokens"], history=trained["history"],
                          metrics=metrics, checkpoint=checkpoint)


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
    (at ``point``, or its ``hook_name``) and detach after. A transcoder is measured at the
    point it writes: its variance, its error, and the zero-ablation of that point.
    """
    if isinstance(dictionary, str):
        name = dictionary
        attached = False
    else:
        name = f"eval-{uuid.uuid4().hex[:8]}"
        model.attach_dictionary(name, dictionary, point=point)
        attached = True
    try:
        summary = model.dictionaries()[name]
        base = summary.get("out_point") or summary["point"]  # the point it writes
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
