"""Quality figures of the default model: ``python -m cloche.default_model.evaluate``.

Prints (and with ``--write`` stores in ``metrics.json`` next to the weights, which the model
card quotes and the tests check):

- held-out cross-entropy (nats/token) of the model on ``cloche.data.default("heldout")``: every
  next-token target inside each 128-token example;
- the same for an add-k smoothed bigram model whose counts come from the training split
  (``cloche.data.default("train")``, same tokenizer, same chunking). ``k`` is picked from a small
  grid as the one best on held-out, i.e. the strongest bigram baseline, not the weakest;
- the induction test (:mod:`cloche.default_model.induction`): best head, its score, and the
  repeated-half / first-half loss ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from cloche.default_model import weights_dir
from cloche.default_model.induction import measure_induction

__all__ = ["bigram_cross_entropy", "evaluate", "heldout_cross_entropy", "main"]

BIGRAM_KS = (1.0, 0.3, 0.1, 0.03, 0.01, 0.003)
METRICS_FILE = "metrics.json"


def _pairs(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(previous, next) token pairs inside every example, in order."""
    prev, nxt = [], []
    for i in range(len(dataset)):
        row = dataset[i]
        prev.append(row[:-1])
        nxt.append(row[1:])
    return torch.cat(prev), torch.cat(nxt)


@torch.no_grad()
def heldout_cross_entropy(model, dataset, batch_size: int = 64) -> tuple[float, int]:
    """Mean next-token cross-entropy (nats) over every target of every example; and the count."""
    model.eval()
    total, count = 0.0, 0
    for batch in dataset.batches(batch_size):
        logits = model(input_ids=batch.tokens, attention_mask=batch.attention_mask).logits
        targets = batch.tokens[:, 1:].clone()
        targets[batch.attention_mask[:, 1:] == 0] = -100
        total += float(
            F.cross_entropy(
                logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="sum"
            )
        )
        count += int((targets != -100).sum())
    return total / count, count


def bigram_cross_entropy(train, heldout, vocab_size: int) -> tuple[float, float]:
    """Held-out cross-entropy of the best add-k bigram model counted on ``train``; and ``k``."""
    a, b = _pairs(train)
    counts = torch.bincount(a * vocab_size + b, minlength=vocab_size * vocab_size).double()
    counts = counts.view(vocab_size, vocab_size)
    row_totals = counts.sum(1)
    ha, hb = _pairs(heldout)
    pair_counts = counts[ha, hb]
    best = (math.inf, 0.0)
    for k in BIGRAM_KS:
        logp = torch.log(pair_counts + k) - torch.log(row_totals[ha] + k * vocab_size)
        best = min(best, (float(-logp.mean()), k))
    return best


def evaluate(directory: Path | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    from cloche import data

    directory = weights_dir() if directory is None else Path(directory)
    model = AutoModelForCausalLM.from_pretrained(str(directory), attn_implementation="eager")
    tok = data.sources._tokenizer(directory)
    heldout = data.default("heldout", tokenizer=tok)
    ce, n_targets = heldout_cross_entropy(model, heldout)
    bigram, k = bigram_cross_entropy(
        data.default("train", tokenizer=tok), heldout, model.config.vocab_size
    )
    ind = measure_induction(model)
    # The same head at another repeat length: a fixed-offset (positional) head would pass the
    # length-64 test without matching content, and fail here.
    other = measure_induction(model, half=48, seed=4321)
    layer, head, _ = ind.best
    return {
        "heldout_ce": round(ce, 5),
        "heldout_targets": n_targets,
        "heldout_fingerprint": heldout.fingerprint(),
        "bigram_ce": round(bigram, 5),
        "bigram_k": k,
        "reduction_vs_bigram": round(1 - ce / bigram, 4),
        "parameters": sum(p.numel() for p in model.parameters()),
        **ind.as_dict(),
        "induction_passes": ind.passes(),
        "induction_score_half48": round(float(other.scores[layer, head]), 4),
        "loss_ratio_half48": round(other.loss_ratio, 4),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Quality figures of the default model.")
    p.add_argument("--dir", type=Path, default=None, help="model folder (default: shipped)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--card",
        type=Path,
        default=None,
        help="with --write: also fill the figures block of this model card",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help=f"store the figures in {METRICS_FILE} inside the model folder",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = evaluate(args.dir)
    text = json.dumps(result, indent=1)
    print(text)
    if args.write:
        directory = weights_dir() if args.dir is None else args.dir
        (Path(directory) / METRICS_FILE).write_text(text + "\n", encoding="utf-8")
        if args.card is not None:
            from cloche.default_model.card import update_card

            update_card(args.card, Path(directory), result)
    ok = result["reduction_vs_bigram"] >= 0.2 and result["induction_passes"]
    print("criteria " + ("met" if ok else "NOT met"), file=sys.stderr)


if __name__ == "__main__":
    main()
