"""The induction-head measurement used while training and on the shipped weights.

The test (as the issue defines it): batches of random token sequences of length ``L`` repeated
twice. An induction head attends from each second-half position ``t`` to ``t - L + 1``, the
position just after the first occurrence of the token at ``t``; its score is that attention
weight, averaged over the batch and over the second-half positions. The behavioural half of the
test is the loss on the repeated half (targets ``L+1 .. 2L-1``) against the loss on the first
half (targets ``1 .. L-1``); the target at ``L`` is the first repeated token, which nothing in
the context predicts, so it is left out of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["InductionResult", "measure_induction", "repeated_random_tokens"]


@dataclass(frozen=True)
class InductionResult:
    scores: torch.Tensor  # (layers, heads): mean attention to t - L + 1
    first_half_loss: float
    repeated_half_loss: float
    prev_scores: torch.Tensor  # (layers, heads): mean attention to t - 1 (previous token)

    @property
    def best(self) -> tuple[int, int, float]:
        """(layer, head, score) of the head with the highest induction score."""
        flat = int(self.scores.argmax())
        layer, head = divmod(flat, self.scores.shape[1])
        return layer, head, float(self.scores[layer, head])

    @property
    def loss_ratio(self) -> float:
        return self.repeated_half_loss / self.first_half_loss

    def passes(self, min_score: float = 0.4, max_ratio: float = 0.5) -> bool:
        return self.best[2] >= min_score and self.loss_ratio <= max_ratio

    def as_dict(self) -> dict:
        layer, head, score = self.best
        return {
            "induction_layer": layer,
            "induction_head": head,
            "induction_score": round(score, 4),
            "first_half_loss": round(self.first_half_loss, 4),
            "repeated_half_loss": round(self.repeated_half_loss, 4),
            "loss_ratio": round(self.loss_ratio, 4),
            "induction_scores": [[round(float(v), 4) for v in row] for row in self.scores],
            "previous_token_scores": [
                [round(float(v), 4) for v in row] for row in self.prev_scores
            ],
        }


def repeated_random_tokens(
    batch: int, half: int, high: int, *, low: int = 2, seed: int = 1234
) -> torch.Tensor:
    """``(batch, 2 * half)`` rows: ``half`` uniform tokens from ``[low, high)``, twice."""
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, high, (batch, half), generator=gen)
    return torch.cat([first, first], dim=1)


@torch.no_grad()
def measure_induction(
    model,
    *,
    batch: int = 32,
    half: int = 64,
    low: int = 2,
    high: int | None = None,
    seed: int = 1234,
) -> InductionResult:
    """Run the repeated-random-tokens test on a Hugging Face causal LM.

    The model must return attentions (``attn_implementation="eager"``); the caller's
    implementation is switched to eager for the measurement and restored afterwards.
    """
    was_training = model.training
    previous = model.config._attn_implementation
    model.eval()
    if previous != "eager":
        model.set_attn_implementation("eager")
    try:
        high = model.config.vocab_size if high is None else high
        tokens = repeated_random_tokens(batch, half, high, low=low, seed=seed)
        out = model(tokens, output_attentions=True)
    finally:
        if previous != "eager":
            model.set_attn_implementation(previous)
        model.train(was_training)
    queries = torch.arange(half, 2 * half)
    keys = queries - half + 1
    scores = torch.stack(
        [att[:, :, queries, keys].mean(dim=(0, 2)) for att in out.attentions]
    ).float()
    pos = torch.arange(1, 2 * half)
    prev = torch.stack([att[:, :, pos, pos - 1].mean(dim=(0, 2)) for att in out.attentions])
    losses = F.cross_entropy(
        out.logits[:, :-1].transpose(1, 2).float(), tokens[:, 1:], reduction="none"
    )  # losses[:, j] is the loss of target j + 1
    first = losses[:, : half - 1].mean().item()  # targets 1 .. half-1
    repeated = losses[:, half:].mean().item()  # targets half+1 .. 2*half-1
    return InductionResult(scores, first, repeated, prev.float())
