"""Write the figures block of the model card (``docs/default-model.md``) from the shipped files.

The block between ``<!-- figures:start -->`` and ``<!-- figures:end -->`` is generated from
``config.json``, ``training.json`` and ``metrics.json`` in the weights folder, so the card never
quotes a number that the shipped files do not hold. Run through
``python -m cloche.default_model.evaluate --write --card docs/default-model.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

from cloche.errors import UsageError

__all__ = ["figures_block", "update_card"]

START = "<!-- figures:start -->"
END = "<!-- figures:end -->"


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _minutes(seconds: float | None) -> str:
    return "unknown" if seconds is None else f"{seconds / 60:.0f} minutes"


def figures_block(directory: Path, metrics: dict) -> str:
    config = _read(directory / "config.json")
    training = _read(directory / "training.json")
    size = (directory / "model.safetensors").stat().st_size
    steps = training.get("steps_done", training.get("steps"))
    switch = training.get("synthetic_steps",
                          training.get("synthetic_phase_steps", training.get("switch")))
    seconds = training.get("train_seconds", training.get("seconds"))
    stage1 = training.get("stage1")
    layer, head = metrics["induction_layer"], metrics["induction_head"]
    prev = metrics.get("previous_token_scores")
    prev_text = "not measured"
    if prev and layer > 0:
        row = prev[layer - 1]
        best = max(range(len(row)), key=row.__getitem__)
        prev_text = f"strongest in layer {layer - 1}: head {layer - 1}.{best}, {row[best]:.2f}"
    lines = [
        "| figure | value |",
        "| --- | --- |",
        (
            f"| layers × heads | {config.get('num_hidden_layers')} × "
            f"{config.get('num_attention_heads')} (hidden {config.get('hidden_size')}, "
            f"MLP {config.get('intermediate_size')}, attention biases: "
            f"{config.get('attention_bias', False)}) |"
        ),
        f"| parameters | {metrics['parameters']:,} |",
        f"| weights file | {size / 2**20:.1f} MiB (safetensors, float32) |",
        f"| training steps | {steps} (opening phase: {switch} steps)"
        + (f", after stage 1's {stage1['steps']} steps |" if stage1 else " |"),
        f"| training wall time | {_minutes(seconds)}"
        + (f" + {_minutes(stage1['seconds'])} (stage 1)" if stage1 else "")
        + " on 2 shared CPU cores |",
        (
            f"| held-out cross-entropy (nats/token, {metrics['heldout_targets']:,} targets) | "
            f"{metrics['heldout_ce']:.4f} |"
        ),
        (
            f"| add-k bigram, counted on the training split (k = {metrics['bigram_k']}) | "
            f"{metrics['bigram_ce']:.4f} |"
        ),
        f"| reduction vs bigram (required ≥ 20%) | {100 * metrics['reduction_vs_bigram']:.1f}% |",
        (
            f"| induction head (score required ≥ 0.4) | {layer}.{head}"
            f" (layer {layer}, head {head}): "
            f"{metrics['induction_score']:.3f} |"
        ),
        (
            f"| repeated-half / first-half loss (required ≤ 0.5) | "
            f"{metrics['repeated_half_loss']:.3f} / {metrics['first_half_loss']:.3f} = "
            f"{metrics['loss_ratio']:.3f} |"
        ),
        (
            f"| same head, sequences of 48 repeated (content check) | score "
            f"{metrics.get('induction_score_half48', float('nan')):.3f}, loss ratio "
            f"{metrics.get('loss_ratio_half48', float('nan')):.3f} |"
        ),
        f"| previous-token attention feeding it (random tokens) | {prev_text} |",
    ]
    return "\n".join(lines)


def update_card(card: Path, directory: Path, metrics: dict) -> None:
    text = card.read_text(encoding="utf-8")
    if START not in text or END not in text:
        raise UsageError(f"{str(card)!r} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    block = figures_block(directory, metrics)
    card.write_text(f"{head}{START}\n{block}\n{END}{tail}", encoding="utf-8")
