"""Train the embedded default model on CPU: ``python -m cloche.default_model.train``.

The recipe, in two phases (see ``docs/default-model.md``):

1. **Opening.** Every ``--opening-code-every``-th step is a plain code batch (see phase 2,
   without repeats: it grows previous-token heads and useful embeddings); the other steps are
   synthetic batches (same number of tokens): each row is random tokens (uniform over the
   non-special vocabulary, or its first ``V`` ids) in which a random sequence of length
   2..S/2 starts at a random offset and then repeats until the row of length ``S`` ends.
   Nothing but copying can lower that loss. A curriculum starts at ``S = 32`` (short rows
   dilute attention less, so the copying gradient is stronger) and, each time the induction
   test on that distribution passes, doubles ``S`` (and quadruples ``V``) up to 128 (and the
   whole vocabulary). Once the full induction test (:mod:`cloche.default_model.induction`)
   passes, or the synthetic budget is spent, training switches to phase 2.
2. **Code.** Rows are random 128-token windows of the training split (files joined, each
   preceded by ``<|endoftext|>``); a fraction ``--repeat-fraction`` of rows has a span of
   ``2 L`` tokens (L in 4..64, random place) overwritten by a random sequence repeated twice,
   so that the circuit keeps being used.

Seeded and re-runnable; checkpoints are written every few minutes (atomically, file by file) so
that a usable model exists at any time, and a JSON-lines log records step, losses and the
induction score.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cloche.default_model import corpus, weights_dir
from cloche.default_model import tokenizer as tok_mod
from cloche.default_model.induction import measure_induction
from cloche.errors import UsageError

__all__ = ["TrainConfig", "build_model", "main", "train"]

N_SPECIAL = 2  # ids 0 (<|endoftext|>) and 1 (<|pad|>) never appear in synthetic spans


@dataclass(kw_only=True)
class TrainConfig:
    out: Path = field(default_factory=weights_dir)
    seed: int = 0
    hidden: int = 128
    layers: int = 3
    attention_bias: bool = True
    heads: int = 4
    seq_len: int = 128
    vocab_size: int = tok_mod.VOCAB_SIZE
    batch_size: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    steps: int = 40000
    max_minutes: float | None = None
    eval_every: int = 200
    checkpoint_minutes: float = 5.0
    synthetic_max_steps: int = 1_000_000
    synthetic_max_minutes: float | None = None
    synthetic_vocab_start: int = tok_mod.VOCAB_SIZE - N_SPECIAL
    synthetic_len_start: int = 32
    opening_code_every: int = 2
    init_std: float = 0.02
    repeat_fraction: float = 0.25
    threads: int = 2
    log: Path | None = None
    init_from: Path | None = None


def build_model(cfg: TrainConfig):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden,
        intermediate_size=4 * cfg.hidden,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.seq_len,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
        initializer_range=cfg.init_std,
        attention_bias=cfg.attention_bias,
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def _lr_at(step: int, cfg: TrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine to ``min_lr_ratio * lr``.

    The cosine follows whichever budget is further spent: steps, or (with ``max_minutes``)
    wall time, so that a run cut short by its time budget still ends at a low learning rate.
    """
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.max_minutes:
        progress = max(progress, min(1.0, elapsed_s / (60 * cfg.max_minutes)))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def _encode_stream(files: list[corpus.CorpusFile], tok) -> torch.Tensor:
    """All files as one id stream, each file preceded by ``<|endoftext|>`` (id 0)."""
    parts = []
    for enc in tok.encode_batch([f.text for f in files]):
        parts.append(torch.tensor([0] + enc.ids, dtype=torch.long))
    return torch.cat(parts)


class Batcher:
    """Seeded source of training rows for both phases."""

    def __init__(self, stream: torch.Tensor, cfg: TrainConfig) -> None:
        self.stream = stream
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.synthetic_high = min(cfg.vocab_size, N_SPECIAL + cfg.synthetic_vocab_start)
        self.synthetic_len = min(cfg.seq_len, cfg.synthetic_len_start)

    @property
    def curriculum_done(self) -> bool:
        return self.synthetic_high >= self.cfg.vocab_size and self.synthetic_len >= self.cfg.seq_len

    def grow(self) -> None:
        """Next curriculum stage: 4x the synthetic vocabulary, 2x the synthetic row length."""
        self.synthetic_high = min(self.cfg.vocab_size, 4 * self.synthetic_high)
        self.synthetic_len = min(self.cfg.seq_len, 2 * self.synthetic_len)

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.gen))

    def _random_tokens(self, n: int, high: int | None = None) -> torch.Tensor:
        high = self.cfg.vocab_size if high is None else high
        return torch.randint(N_SPECIAL, high, (n,), generator=self.gen)

    def synthetic_row(self) -> torch.Tensor:
        n = self.synthetic_len
        length = self._randint(2, n // 2 + 1)
        start = self._randint(0, n - 2 * length + 1)
        seq = self._random_tokens(length, self.synthetic_high)
        reps = math.ceil((n - start) / length)
        noise = self._random_tokens(start, self.synthetic_high)
        return torch.cat([noise, seq.repeat(reps)])[:n]

    def code_row(self, with_repeat: bool) -> torch.Tensor:
        n = self.cfg.seq_len
        offset = self._randint(0, len(self.stream) - n)
        row = self.stream[offset : offset + n].clone()
        if with_repeat:
            length = self._randint(4, n // 2 + 1)
            start = self._randint(0, n - 2 * length + 1)
            seq = self._random_tokens(length)
            row[start : start + 2 * length] = torch.cat([seq, seq])
        return row

    def batch(self, phase: int, step: int = 0) -> torch.Tensor:
        rows = []
        every = self.cfg.opening_code_every
        if phase == 1 and every and step % every == 0:
            return torch.stack([self.code_row(False) for _ in range(self.cfg.batch_size)])
        if phase == 1:
            count = self.cfg.batch_size * self.cfg.seq_len // self.synthetic_len
            return torch.stack([self.synthetic_row() for _ in range(count)])
        for _ in range(self.cfg.batch_size):
            repeat = float(torch.rand((), generator=self.gen)) < self.cfg.repeat_fraction
            rows.append(self.code_row(repeat))
        return torch.stack(rows)


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, batch: int = 64) -> float:
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        logits = model(chunk).logits
        loss = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += chunk[:, 1:].numel()
    model.train(was)
    return total / count


def save_checkpoint(model, out: Path, extra: dict) -> None:
    """Save via a temporary folder, then replace files one by one (each replace is atomic)."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "training.json").write_text(json.dumps(extra, indent=1) + "\n")
        for name in os.listdir(tmp):
            os.chmod(Path(tmp) / name, 0o644)  # package data must be readable by every user
            os.replace(Path(tmp) / name, out / name)


def train(cfg: TrainConfig) -> dict:
    """Run the whole recipe; returns the state also stored in ``training.json``."""
    with contextlib.ExitStack() as stack:
        log_fh = stack.enter_context(open(cfg.log, "a", encoding="utf-8")) if cfg.log else None

        def log(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            if log_fh:
                log_fh.write(line + "\n")
                log_fh.flush()

        return _run(cfg, log)


def _run(cfg: TrainConfig, log) -> dict:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    files = corpus.train_files()
    try:
        diff = corpus.compare_manifest(files, corpus.load_manifest())
        print(diff.summary(), file=sys.stderr, flush=True)
    except UsageError as exc:  # no shipped manifest yet: first training run
        print(f"no shipped manifest to compare with ({exc})", file=sys.stderr, flush=True)
    official = cfg.out.resolve() == weights_dir().resolve()
    python_version = ".".join(map(str, sys.version_info[:3]))
    if official:
        corpus.write_manifest(files, python_version)
    else:
        corpus.write_manifest(files, python_version, cfg.out)
    try:
        held = corpus.heldout_files()
    except UsageError:  # first run on a fresh tree: bootstrap the shipped held-out split
        held = [f for f in corpus.scan_stdlib() if corpus.is_heldout(f.path)]
        corpus.write_heldout(held)

    if cfg.init_from is not None:  # keep the checkpoint's tokenizer: its ids are the model's
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(cfg.init_from) / "tokenizer.json"))
    else:
        tok = tok_mod.train_tokenizer(f.text for f in files)
    cfg.out.mkdir(parents=True, exist_ok=True)
    tok_mod.save(tok, cfg.out)
    stream = _encode_stream(files, tok)
    held_stream = _encode_stream(held, tok)
    n_rows = len(held_stream) // cfg.seq_len
    held_rows = held_stream[: n_rows * cfg.seq_len].view(n_rows, cfg.seq_len)
    probe_rows = held_rows[torch.linspace(0, n_rows - 1, 64).long()]
    log(
        {
            "event": "data",
            "train_tokens": len(stream),
            "heldout_tokens": len(held_stream),
            "train_files": len(files),
            "heldout_files": len(held),
        }
    )

    if cfg.init_from is not None:  # continue from a checkpoint (weights only; fresh optimiser)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(cfg.init_from))
    else:
        model = build_model(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    batcher = Batcher(stream, cfg)
    phase, switch_step = 1, None
    last_ckpt = time.time()
    running, running_n = 0.0, 0
    state: dict = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "parameters": n_params,
        "python_version": python_version,
    }
    step = 0
    for step in range(cfg.steps):
        lr = _lr_at(step, cfg, time.time() - t0)
        for group in opt.param_groups:
            group["lr"] = lr
        loss = lm_loss(model, batcher.batch(phase, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running += float(loss.detach())
        running_n += 1
        elapsed = time.time() - t0
        out_of_time = cfg.max_minutes is not None and elapsed > 60 * cfg.max_minutes
        last = step == cfg.steps - 1 or out_of_time
        if (step + 1) % cfg.eval_every == 0 or last:
            ind = measure_induction(model, batch=16)
            layer, head, score = ind.best
            sub = None
            if phase == 1 and not batcher.curriculum_done:
                sub = measure_induction(
                    model, batch=16, high=batcher.synthetic_high, half=batcher.synthetic_len // 2
                )
            log(
                {
                    "step": step + 1,
                    "phase": phase,
                    "elapsed_s": round(elapsed, 1),
                    "lr": round(lr, 6),
                    "train_loss": round(running / running_n, 4),
                    "heldout_loss": round(heldout_loss(model, probe_rows), 4),
                    "induction": f"{layer}.{head}",
                    "induction_score": round(score, 4),
                    "prev_token": [round(float(v), 3) for v in ind.prev_scores.max(dim=1).values],
                    "loss_ratio": round(ind.loss_ratio, 4),
                    "synthetic_vocab": batcher.synthetic_high - N_SPECIAL if phase == 1 else None,
                    "synthetic_len": batcher.synthetic_len if phase == 1 else None,
                    "sub_head": f"{sub.best[0]}.{sub.best[1]}" if sub else None,
                    "sub_score": round(sub.best[2], 4) if sub else None,
                    "sub_ratio": round(sub.loss_ratio, 4) if sub else None,
                }
            )
            running, running_n = 0.0, 0
            if sub is not None and sub.passes():
                batcher.grow()
                log(
                    {
                        "event": "curriculum",
                        "step": step + 1,
                        "vocab": batcher.synthetic_high - N_SPECIAL,
                        "len": batcher.synthetic_len,
                    }
                )
            synthetic_spent = step + 1 >= cfg.synthetic_max_steps or (
                cfg.synthetic_max_minutes is not None and elapsed > 60 * cfg.synthetic_max_minutes
            )
            if phase == 1 and ((batcher.curriculum_done and ind.passes()) or synthetic_spent):
                phase, switch_step = 2, step + 1
                log({"event": "phase2", "step": step + 1, "induction_passed": ind.passes()})
        state.update(
            {
                "steps_done": step + 1,
                "synthetic_steps": switch_step or step + 1,
                "phase": phase,
                "train_seconds": round(time.time() - t0, 1),
            }
        )
        if last or time.time() - last_ckpt > 60 * cfg.checkpoint_minutes:
            save_checkpoint(model, cfg.out, state)
            last_ckpt = time.time()
            log({"event": "checkpoint", "step": step + 1})
        if out_of_time:
            break
    return state


def _parse(argv: list[str] | None) -> TrainConfig:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out",
        type=Path,
        default=defaults.out,
        help="output folder (default: the package's weights folder)",
    )
    for name in (
        "seed",
        "hidden",
        "layers",
        "heads",
        "batch_size",
        "warmup",
        "steps",
        "eval_every",
        "synthetic_max_steps",
        "synthetic_vocab_start",
        "synthetic_len_start",
        "opening_code_every",
        "threads",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "repeat_fraction", "checkpoint_minutes", "weight_decay", "init_std"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    p.add_argument(
        "--max-minutes", type=float, default=None, help="stop (and save) after this much wall time"
    )
    p.add_argument(
        "--synthetic-max-minutes",
        type=float,
        default=None,
        help="switch to the code phase after this much wall time at the latest",
    )
    p.add_argument(
        "--attention-bias",
        action=argparse.BooleanOptionalAction,
        default=defaults.attention_bias,
        help="biases on q/k/v/o (a constant query/key part lets layer 0 learn a "
        "previous-token head; on by default)",
    )
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this checkpoint's weights (same tokenizer) instead of fresh",
    )
    p.add_argument("--log", type=Path, default=None, help="append JSON-lines records here")
    args = p.parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> None:
    cfg = _parse(argv)
    state = train(cfg)
    print(json.dumps({"event": "done", **{k: v for k, v in state.items() if k != "config"}}))


if __name__ == "__main__":
    main()
