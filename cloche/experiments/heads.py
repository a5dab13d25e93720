"""Attention heads and the residual stream: head scores, attention patterns, the logit lens.

Head scores follow the usual recipe: batches of random token sequences, each repeated twice
(seeded, so every caller sees the same batch). On such inputs

- a **previous-token** head attends from position ``t`` to ``t - 1``;
- a **duplicate-token** head attends from a second-half position ``t`` to ``t - L``, the
  earlier copy of the same token;
- an **induction** head attends from ``t`` to ``t - L + 1``, the token that followed the
  earlier copy.

The score is the mean attention weight on that key, over the batch and the relevant queries.
It is computed by probes at every ``layers.{i}.attn.pattern`` that reduce to one number per
head on the server; only the (n_layers, n_heads) table crosses the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cloche.errors import UsageError
from cloche.experiments._common import as_tensor, reports, scratch

__all__ = ["HEAD_SCORE_KINDS", "HeadScores", "LogitLens", "attention_patterns", "detect_heads",
           "head_logit_attribution", "head_scores", "logit_lens", "repeated_tokens", "top_heads"]

HEAD_SCORE_KINDS = ("previous_token", "induction", "duplicate_token")


def default_low(d_vocab: int) -> int:
    """Lowest token id used for random sequences: skips the low ids where special tokens live."""
    return max(2, min(64, d_vocab // 4))


def repeated_tokens(model: Any, *, batch: int = 16, half: int = 32, seed: int = 0,
                    low: int | None = None, high: int | None = None) -> torch.Tensor:
    """``(batch, 2 * half)`` token ids: ``half`` uniform random tokens from ``[low, high)``, twice.

    Seeded (``torch.Generator().manual_seed(seed)``), so the same arguments give the same batch.
    """
    d_vocab = int(model.d_vocab)
    low = default_low(d_vocab) if low is None else int(low)
    high = d_vocab if high is None else int(high)
    if not 0 <= low < high <= d_vocab:
        raise UsageError(f"token range [{low}, {high}) must lie within the vocabulary ({d_vocab})")
    if half < 2:
        raise UsageError(f"half ({half}) must be at least 2")
    gen = torch.Generator().manual_seed(seed)
    first = torch.randint(low, high, (batch, half), generator=gen)
    return torch.cat([first, first], dim=1)


def _score_probe(kind: str, half: int, name: str) -> Any:
    def score_probe(ctx: Any, pattern: torch.Tensor) -> None:
        from cloche import Mean

        seq = pattern.shape[-1]
        if kind == "previous_token":
            q = torch.arange(1, seq, device=pattern.device)
            k = q - 1
        else:
            q = torch.arange(half, seq, device=pattern.device)
            k = q - half + (1 if kind == "induction" else 0)
        per_row = pattern[:, :, q, k].float().mean(-1)  # (batch, head)
        ctx.reduce(f"{name}.{ctx.layer}", per_row, Mean())

    return score_probe


class HeadScores(np.ndarray):
    """A (n_layers, n_heads) array of head scores that knows its ``kind`` (and shows itself
    as a shaded grid in a notebook). Arithmetic and indexing work as on any ndarray."""

    kind: str = ""

    def __array_finalize__(self, obj: Any) -> None:
        self.kind = getattr(obj, "kind", "")

    def _repr_html_(self) -> str:
        from cloche.experiments.html import grid

        if self.ndim != 2:
            return f"<pre>{np.asarray(self)!r}</pre>"
        return grid(np.asarray(self), rows=range(self.shape[0]), columns=range(self.shape[1]),
                    row_label="layer \\ head", caption=f"{self.kind} head scores")


@reports
def head_scores(model: Any, kind: str, *, batch: int = 16, half: int = 32, seed: int = 0,
                low: int | None = None, high: int | None = None, progress: Any = True
                ) -> HeadScores:
    """(n_layers, n_heads) scores of ``kind``: ``"previous_token"``, ``"induction"`` or
    ``"duplicate_token"`` (see the module docstring), on :func:`repeated_tokens` inputs.
    ``progress``: a bar once the call takes a second or waits in a queue (``False``: none;
    a callable: the events, see ``cloche.Progress``)."""
    if kind not in HEAD_SCORE_KINDS:
        raise UsageError(f"kind must be one of {HEAD_SCORE_KINDS}, not {kind!r}")
    tokens = repeated_tokens(model, batch=batch, half=half, seed=seed, low=low, high=high)
    n_layers = int(model.n_layers)
    points = [f"layers.{i}.attn.pattern" for i in range(n_layers)]
    probe = _score_probe(kind, half, "score")
    with scratch(model, "heads") as name:
        model.run(tokens, probes=dict.fromkeys(points, probe), save=name, return_logits=False)
        handle = model.save_context(name)
        rows = [np.asarray(handle.result(f"score.{i}")["mean"], dtype=np.float64)
                for i in range(n_layers)]
    return _head_grid(np.stack(rows), kind)


def _detection_pattern(kind: str, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerLens' detection patterns, (batch, query, key) of 0/1, lower triangular."""
    seq = tokens.shape[-1]
    if kind == "previous_token":
        single = torch.zeros(seq, seq)
        single[1:, :-1] = torch.eye(seq - 1)
        return single.expand(tokens.shape[0], seq, seq)
    same = (tokens[:, :, None] == tokens[:, None, :]).float().tril(-1)  # an earlier copy
    if kind == "duplicate_token":
        return same
    shifted = torch.zeros_like(same)  # induction: the token after an earlier copy
    shifted[:, :, 1:] = same[:, :, :-1]
    return shifted.tril()


@reports
def detect_heads(model: Any, tokens: Any, kind: str, *, exclude_bos: bool = False,
                 exclude_current_token: bool = False, progress: Any = True) -> np.ndarray:
    """(n_layers, n_heads) detection scores as TransformerLens' ``detect_head`` computes them
    (its ``"mul"`` measure), averaged over the rows of ``tokens`` (equal-length token ids).

    For each row and head: the attention on the keys the detection pattern marks, summed over
    every query, divided by the attention summed over every query (after zeroing the first key
    if ``exclude_bos``, the diagonal if ``exclude_current_token``). The patterns: the previous
    token; any earlier copy of the same token (duplicate); the token after any earlier copy
    (induction). :func:`head_scores` is the simpler mean attention on the one expected key
    over repeated random tokens. ``kind`` is one of :data:`HEAD_SCORE_KINDS`, with or without
    TransformerLens' ``_head`` suffix.
    """
    kind = kind.removesuffix("_head")
    if kind not in HEAD_SCORE_KINDS:
        raise UsageError(f"kind must be one of {HEAD_SCORE_KINDS}, not {kind!r}")
    ids = as_tensor(tokens).long()
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[-1] < 2:
        raise UsageError("head detection needs at least two tokens per row")
    n_layers = int(model.n_layers)

    def detect_probe(ctx: Any, pattern: torch.Tensor) -> None:
        from cloche import Mean

        p = pattern.float().clone()
        if exclude_bos:
            p[..., 0] = 0
        if exclude_current_token:
            p.diagonal(dim1=-2, dim2=-1).zero_()
        det = _detection_pattern(kind, ctx.tokens.to(p.device)).to(p)
        score = (p * det[:, None]).sum((-2, -1)) / p.sum((-2, -1))  # (batch, head)
        ctx.reduce(f"detect.{ctx.layer}", score, Mean())

    points = [f"layers.{i}.attn.pattern" for i in range(n_layers)]
    with scratch(model, "detect") as name:
        model.run(ids, probes=dict.fromkeys(points, detect_probe), save=name,
                  return_logits=False)
        handle = model.save_context(name)
        rows = [np.asarray(handle.result(f"detect.{i}")["mean"], dtype=np.float64)
                for i in range(n_layers)]
    return _head_grid(np.stack(rows), f"{kind} detection")


def _head_grid(values: Any, kind: str) -> HeadScores:
    """A (n_layers, n_heads) table as a :class:`HeadScores` of ``kind`` (a grid in notebooks)."""
    grid = np.asarray(values).view(HeadScores)
    grid.kind = kind
    return grid


def top_heads(scores: np.ndarray, n: int = 3) -> list[tuple[int, int, float]]:
    """The ``n`` highest entries of a head-score table as (layer, head, score), best first."""
    flat = np.argsort(-scores, axis=None, kind="stable")[:n]
    return [(int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.flat[i]))
            for i in flat]


@reports
def attention_patterns(model: Any, text: Any, layer: int, heads: Any = None, *,
                       progress: Any = True) -> dict[str, Any]:
    """Attention of ``layer`` on one prompt: ``{"tokens": [str], "pattern": (heads, q, k)}``.

    ``text`` is a string or a 1-D tensor of token ids; ``heads`` an int, a list, or None (all).
    Only the requested heads' patterns for this one prompt cross the network.
    """
    ids = model.tokenize(text) if isinstance(text, str) else as_tensor(text).long().reshape(-1)
    sel = None if heads is None else [heads] if isinstance(heads, int) else list(heads)

    def keep_pattern(ctx: Any, pattern: torch.Tensor) -> None:
        p = pattern[0] if sel is None else pattern[0, sel]
        ctx.save("pattern", p.float())

    with scratch(model, "pattern") as name:
        model.run(ids, probes={f"layers.{layer}.attn.pattern": keep_pattern}, save=name,
                  return_logits=False)
        pattern = model.save_context(name).fetch("pattern")[0]
    try:
        tokens = model.to_str_tokens(ids)
    except UsageError:
        tokens = [f"<{int(i)}>" for i in ids]
    return {"tokens": tokens, "pattern": pattern.numpy(), "heads": sel}


@dataclass(frozen=True)
class LogitLens:
    """What each layer's residual stream predicts, read through the final norm and unembedding.

    ``logprobs`` (n_layers, seq, k) and ``token_ids`` (n_layers, seq, k) are the top-k next
    tokens per layer and position; ``top_tokens`` their decoded strings; ``target_logprob``
    (n_layers, seq - 1) the log-probability each layer gives the actual next token.
    """

    tokens: list[str]
    token_ids: np.ndarray
    logprobs: np.ndarray
    top_tokens: list[list[list[str]]]
    target_logprob: np.ndarray


@reports
def logit_lens(model: Any, text: Any, *, k: int = 5, progress: Any = True) -> LogitLens:
    """The logit lens on one prompt, computed on the server.

    Each layer's ``resid_post`` is fed to the final norm in place of the last layer's
    (a probe on the norm's input), so the lens uses the model's own norm and unembedding.
    """
    ids = model.tokenize(text) if isinstance(text, str) else as_tensor(text).long().reshape(-1)
    out = model.call(_logit_lens, ids, int(k))
    return LogitLens(**out)


def _logit_lens(m: Any, ids: torch.Tensor, k: int) -> dict[str, Any]:
    """Runs on the server: one run to read every resid_post, one per layer to read the lens."""
    import numpy as np
    import torch

    from cloche.errors import UsageError
    from cloche.experiments._common import scratch, str_tokens

    norm = next((p.module for p in m.probe_points() if p.name == "final_norm"), None)
    if norm is None:
        raise UsageError("this model has no final norm point: the logit lens needs one")
    n = int(m.n_layers)
    with scratch(m, "lens") as name:
        m.run(ids, probes={f"layers.{i}.resid_post": (lambda c, x: c.save(f"r{c.layer}", x))
                           for i in range(n)}, save=name, return_logits=False)
        handle = m.save_context(name)
        resid = [handle.fetch(f"r{i}")[0] for i in range(n)]
    logprobs, top_ids, target = [], [], []
    for r in resid:
        logits = m.run(ids, probes={f"module:{norm}:input": lambda c, x, r=r: r.to(x)}).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        v, i = lp.topk(k, -1)
        logprobs.append(v.numpy())
        top_ids.append(i.numpy())
        target.append(lp[:-1].gather(-1, ids.reshape(-1)[1:, None].to(lp.device))[:, 0].numpy())
    token_ids = np.stack(top_ids)
    return {
        "tokens": str_tokens(m, ids.reshape(-1).tolist()),
        "token_ids": token_ids,
        "logprobs": np.stack(logprobs),
        "top_tokens": [[str_tokens(m, row) for row in layer] for layer in token_ids.tolist()],
        "target_logprob": np.stack(target),
    }


@reports
def head_logit_attribution(model: Any, tokens: Any, answer: Any, *, position: int = -1,
                           progress: Any = True) -> np.ndarray:
    """Direct logit attribution per head: ``(n_layers, n_heads)``, averaged over the batch.

    Each head's ``attn.result`` at ``position`` (its z times its W_O), through the final norm as
    the forward pass normalised the whole residual stream there (the same scale, the same
    centring for a LayerNorm, the norm's weight; not its bias) and the unembedding, dotted with
    the unembedding direction of ``answer`` (a token id, or one per row). This is
    TransformerLens' ``cache.stack_head_results(layer=-1, pos_slice=position, apply_ln=True)``
    projected on ``W_U[:, answer]`` for a model whose final-norm weight is folded into ``W_U``
    (TransformerLens' default processing); computed next to the model, only the table returns.
    """
    ids = as_tensor(tokens).long()
    ids = ids[None] if ids.dim() == 1 else ids
    wanted = torch.as_tensor(answer, dtype=torch.long).reshape(-1)
    if wanted.numel() not in (1, ids.shape[0]):
        raise UsageError(f"answer must be one token id or one per row ({ids.shape[0]}), got"
                         f" {wanted.numel()}")
    # the final norm lives on the last rank of a sharded model: read its linear part there
    norm = {p.name: p for p in model.probe_points()}.get("final_norm")
    if norm is None or not norm.module:
        raise UsageError("head_logit_attribution needs 'final_norm', which this model lacks")
    last = model.world_size - 1
    centred, gain = model.call(_final_norm_linear, norm.module, rank=last if last else None)
    return _head_grid(model.call(_head_logit_attribution, ids, wanted, int(position),
                                 centred, gain), "direct logit attribution")


def _final_norm_linear(m: Any, path: str) -> tuple[bool, Any]:
    """Runs where the final norm (module ``path``) lives: whether it centres (a LayerNorm) and
    the gain it multiplies by (Gemma's RMSNorms multiply by ``1 + weight``); not its bias."""
    import torch

    norm = dict(m.hf_model.named_modules())[path]
    centred = isinstance(norm, torch.nn.LayerNorm)
    weight = getattr(norm, "weight", None)
    gain = (torch.ones(1) if weight is None else
            1.0 + weight.detach().float() if type(norm).__name__.startswith("Gemma")
            else weight.detach().float())
    return centred, gain.cpu()


def _head_logit_attribution(m: Any, ids: torch.Tensor, answer: torch.Tensor, position: int,
                            centred: bool, gain: torch.Tensor) -> Any:
    """Runs next to the model: one forward reading every attn.result and the final scale."""
    import torch

    from cloche.errors import UsageError
    from cloche.experiments._common import scratch

    points = {p.name: p for p in m.probe_points()}
    n = int(m.n_layers)
    needed = [*(f"layers.{i}.attn.result" for i in range(n)), "final_norm.scale"]
    lacking = [p for p in needed if p not in points]
    if lacking:
        raise UsageError(f"head_logit_attribution needs {lacking[0]!r}, which this model lacks")

    def keep(ctx: Any, x: torch.Tensor) -> None:
        ctx.save("scale" if ctx.layer is None else f"r{ctx.layer}", x[:, position].float())

    with scratch(m, "dla") as name:
        m.run(ids, probes=dict.fromkeys(needed, keep), save=name, return_logits=False)
        handle = m.save_context(name)
        scale = handle.fetch("scale")[0]  # (batch, 1)
        results = torch.stack([handle.fetch(f"r{i}")[0] for i in range(n)], 1)  # (b, L, H, d)
    if centred:
        results = results - results.mean(-1, keepdim=True)
    w_u = m.param("unembed.W_U").float()  # (d_model, d_vocab)
    directions = w_u[:, answer.to(w_u.device)].T.expand(ids.shape[0], -1)  # (batch, d_model)
    normalised = results / scale.to(results.device)[:, None, None] * gain.to(results.device)
    return torch.einsum("blhd,bd->blh", normalised, directions.to(results.device)).mean(0)

