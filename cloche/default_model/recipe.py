"""The recipe that produced the shipped default model: ``python -m cloche.default_model.recipe``.

Two stages, both seeded, both on one CPU thread:

1. ``--stage 1`` (from scratch, ~2,000 steps): batches alternate between rows that are one
   random 64-token span written twice and code rows holding a repeated span of random length.
   A head forms within ~400 steps — but, as the fixed offset lets it, a *positional* one (it
   looks 63 tokens back). After the induction test passes, training continues on code with
   every other batch synthetic.
2. ``--stage 2 --init STAGE1`` (~55 min): the synthetic rows now repeat a span of random
   length (8..64) at a random offset on a background of random tokens, so only matching
   content predicts anything; every other batch is code with a repeated span in a quarter of
   its rows. The positional head dies at once, and a real induction head (previous-token head
   in layer 0, K-composition in layer 1) forms after ~1,300 steps; from then on the synthetic
   batches only keep it alive (every second, later every third, step) while the code loss
   falls under a cosine schedule that follows the wall-clock budget.

The stage-1 shortcut and the stage-2 cure are documented in ``docs/default-model.md``; the
learning rate follows the wall-clock budget (as in the original run), so a re-run reproduces
the recipe and its figures within noise, not bit for bit. Each stage writes a Hugging Face
checkpoint (weights, tokenizer, ``training.json``) and a JSON-lines log into ``--out``, and
prints to stderr how this machine's training split differs from the shipped manifest.

This is the package's only trainer for the default model; the pieces (:func:`plan`,
:class:`Rows`, :func:`train_step`, :func:`save_checkpoint`) are tested on their own in
``tests/default_model/test_recipe.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cloche.default_model import corpus
from cloche.default_model import tokenizer as tok_mod
from cloche.default_model.induction import measure_induction
from cloche.errors import UsageError

__all__ = ["BATCH", "LR", "SEQ", "VOCAB", "Rows", "StepPlan", "build_model", "encode_stream",
           "heldout_loss", "leaves_opening", "main", "make_optimizer", "plan", "save_checkpoint",
           "train", "train_step"]

SEQ, BATCH, LR = 128, 16, 1e-3
VOCAB = tok_mod.VOCAB_SIZE  # 4096
N_SPECIAL = 2  # ids 0 (<|endoftext|>) and 1 (<|pad|>) never appear in synthetic spans


def build_model(**overrides):
    """The shipped architecture, freshly initialised from torch's global RNG.

    ``overrides`` replace ``LlamaConfig`` fields (the tests build a tiny model this way); the
    recipe itself passes none.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = {
        "vocab_size": VOCAB, "hidden_size": 128, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "max_position_embeddings": SEQ, "tie_word_embeddings": True,
        "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1,
    }
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))


def make_optimizer(model) -> torch.optim.Optimizer:
    """AdamW, betas 0.9/0.98, no weight decay (the learning rate is set every step)."""
    return torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)


class StepPlan(NamedTuple):
    """What one training step does."""

    lr: float
    synthetic: bool  # a synthetic batch (else a code batch)
    span_fraction: float  # share of code rows given a repeated span (code batches only)


def plan(stage: int, phase: int, step: int, progress: float) -> StepPlan:
    """The schedule: learning rate and batch kind of ``step``.

    ``phase`` 1 runs until the induction test passes (see :func:`leaves_opening`): constant
    learning rate, synthetic batches on even steps, code with a repeated span in every row on
    odd ones. In phase 2 the learning rate follows a cosine from ``LR`` to ``LR / 10`` over
    ``progress`` (the share of the wall-clock budget spent), a quarter of code rows hold a
    span, and synthetic batches come every second step — every third in stage 2 once 70% of
    the budget is spent.
    """
    if phase == 1:
        return StepPlan(LR, step % 2 == 0, 1.0)
    lr = LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    every = 2 if (stage == 1 or progress < 0.7) else 3
    return StepPlan(lr, step % every == 0, 0.25)


def leaves_opening(passed: bool, step: int, progress: float) -> bool:
    """Whether phase 1 ends at an evaluation (every 100 steps) after ``step`` steps.

    It ends once the stage's induction test passes (from step 200 on), or once half of the
    wall-clock budget is spent, whichever comes first.
    """
    return (passed and step >= 200) or progress > 0.5


class Rows:
    """Seeded training rows: code windows, and random spans written twice."""

    def __init__(self, stream: torch.Tensor, seed: int) -> None:
        self.stream = stream
        self.gen = torch.Generator().manual_seed(seed)

    def _int(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.gen))

    def code(self) -> torch.Tensor:
        offset = self._int(0, len(self.stream) - SEQ)
        return self.stream[offset: offset + SEQ]

    def with_span(self, base: torch.Tensor) -> torch.Tensor:
        """``base`` with a random span of random length (8..64) written twice somewhere."""
        half = self._int(8, SEQ // 2 + 1)
        span = torch.randint(N_SPECIAL, VOCAB, (half,), generator=self.gen)
        start = self._int(0, SEQ - 2 * half + 1)
        row = base.clone()
        row[start: start + 2 * half] = torch.cat([span, span])
        return row

    def fixed_repeat_batch(self) -> torch.Tensor:
        """Stage 1's synthetic batch: each row one random ``SEQ / 2``-token span written twice."""
        spans = torch.randint(N_SPECIAL, VOCAB, (BATCH, SEQ // 2), generator=self.gen)
        return torch.cat([spans, spans], dim=1)

    def random_repeat_batch(self) -> torch.Tensor:
        """Stage 2's synthetic batch: random tokens holding one span of random length twice."""
        noise = torch.randint(N_SPECIAL, VOCAB, (BATCH, SEQ), generator=self.gen)
        return torch.stack([self.with_span(row) for row in noise])

    def code_batch(self, span_fraction: float) -> torch.Tensor:
        """Code windows; each holds a repeated span with probability ``span_fraction``."""
        rows = []
        for _ in range(BATCH):
            row = self.code()
            if float(torch.rand((), generator=self.gen)) < span_fraction:
                row = self.with_span(row)
            rows.append(row)
        return torch.stack(rows)

    def batch(self, stage: int, step_plan: StepPlan) -> torch.Tensor:
        """The batch that ``step_plan`` asks for, in ``stage``."""
        if step_plan.synthetic:
            return self.fixed_repeat_batch() if stage == 1 else self.random_repeat_batch()
        return self.code_batch(step_plan.span_fraction)


def encode_stream(files: list[corpus.CorpusFile], tok) -> torch.Tensor:
    """All files as one id stream, each file preceded by ``<|endoftext|>`` (id 0)."""
    parts = [torch.tensor([0, *enc.ids], dtype=torch.long)
             for enc in tok.encode_batch([f.text for f in files])]
    return torch.cat(parts)


@torch.no_grad()
def heldout_loss(model, rows: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token cross-entropy over ``rows`` (the mode of ``model`` is restored)."""
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
    """Save ``model`` and ``extra`` (as ``training.json``) in Hugging Face format.

    Written to a temporary folder next to ``out``, then moved in file by file (each replace is
    atomic); the files are made world-readable, as package data must be.
    """
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".ckpt-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        (Path(tmp) / "training.json").write_text(json.dumps(extra, indent=1) + "\n")
        for name in os.listdir(tmp):
            os.chmod(Path(tmp) / name, 0o644)
            os.replace(Path(tmp) / name, out / name)


def train_step(model, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float) -> float:
    """One optimiser step on the next-token loss of ``batch``; returns that loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    logits = model(batch).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def _manifest_summary(files: list[corpus.CorpusFile]) -> str:
    """How this machine's training split differs from the one the shipped model saw."""
    try:
        return corpus.compare_manifest(files, corpus.load_manifest()).summary()
    except UsageError as exc:
        return f"no shipped manifest to compare with ({exc})"


def _induction(model) -> dict:
    at64 = measure_induction(model, batch=8)
    layer, head, score = at64.best
    at40 = measure_induction(model, batch=8, half=40, seed=4321)
    score40 = float(at40.scores[layer, head])
    return {"head": f"{layer}.{head}", "score": round(score, 3), "ratio": round(at64.loss_ratio, 3),
            "score40": round(score40, 3), "ratio40": round(at40.loss_ratio, 3),
            "real": at64.passes() and score40 >= 0.4 and at40.loss_ratio <= 0.5,
            "passes64": at64.passes()}


def train(stage: int, out: Path, minutes: float, steps: int | None, init: Path | None,
          seed: int, log: Callable[[dict], None]) -> dict:
    """Run one stage into ``out``; returns the state also stored in ``out/training.json``.

    Stops after ``minutes`` of wall time or ``steps`` steps, whichever comes first;
    ``minutes`` is also the budget that the phase switch and the schedule follow.
    """
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    files, held = corpus.train_files(), corpus.heldout_files()
    print(_manifest_summary(files), file=sys.stderr, flush=True)
    if init is not None:
        from tokenizers import Tokenizer
        from transformers import LlamaForCausalLM

        tok = Tokenizer.from_file(str(init / "tokenizer.json"))
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (out / name).write_bytes((init / name).read_bytes())
        model = LlamaForCausalLM.from_pretrained(init)
    else:
        tok = tok_mod.train_tokenizer(f.text for f in files)
        tok_mod.save(tok, out)
        model = build_model()
    stream, held_stream = encode_stream(files, tok), encode_stream(held, tok)
    n = len(held_stream) // SEQ
    probe_rows = held_stream[: n * SEQ].view(n, SEQ)[torch.linspace(0, n - 1, 64).long()]
    rows = Rows(stream, seed + stage)
    model.train()
    opt = make_optimizer(model)
    log({"event": "start", "stage": stage, "init": str(init) if init else None,
         "train_tokens": len(stream)})
    started, phase, switch, step, losses = time.time(), 1, None, 0, []
    while True:
        elapsed = time.time() - started
        if elapsed > 60 * minutes or (steps is not None and step >= steps):
            break
        progress = min(1.0, elapsed / (60 * minutes))
        now = plan(stage, phase, step, progress)
        losses.append(train_step(model, opt, rows.batch(stage, now), now.lr))
        step += 1
        if step % (100 if phase == 1 else 400) == 0:
            ind = _induction(model)
            log({"step": step, "phase": phase, "t": round(elapsed), "lr": round(now.lr, 6),
                 "train": round(sum(losses) / len(losses), 4),
                 "heldout": round(heldout_loss(model, probe_rows), 4), **ind})
            losses = []
            passed = ind["passes64"] if stage == 1 else ind["real"]
            if phase == 1 and leaves_opening(passed, step, progress):
                phase, switch = 2, step
                log({"event": "phase2", "step": step, "passed": passed})
    state = {"recipe": "cloche.default_model.recipe", "stage": stage, "steps": step,
             "switch": switch, "seconds": round(time.time() - started),
             "init": str(init) if init else None, "seed": seed}
    save_checkpoint(model, out, state)
    log({"event": "done", **state})
    return state


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder")
    parser.add_argument("--init", type=Path, default=None,
                        help="stage 2 starts from stage 1's folder")
    parser.add_argument("--minutes", type=float, default=55.0, help="wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.stage == 2 and args.init is None:
        parser.error("--stage 2 needs --init (the stage-1 folder)")
    log_path = args.out / "log.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8") as fh:
        def log(record: dict) -> None:
            line = json.dumps(record)
            print(line, flush=True)
            fh.write(line + "\n")
            fh.flush()

        train(args.stage, args.out, args.minutes, args.steps, args.init, args.seed, log)


if __name__ == "__main__":
    main()
