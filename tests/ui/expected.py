"""What the pages should show, computed independently of ``cloche.ui`` through the public API
(probes that save raw activations, weights, logits) and numpy."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SKIP_FIRST = 4  # the unit page's choice, as in cloche.experiments.top_examples


def induction_scores(model: Any, half: int = 32) -> np.ndarray:
    """Mean attention from t to t - half + 1 over the repeated random tokens head_scores uses."""
    import cloche

    tokens = cloche.experiments.repeated_tokens(model, half=half)
    name = "test-ui/induction"
    points = {f"layers.{i}.attn.pattern": (lambda c, x: c.save(f"p{c.layer}", x))
              for i in range(model.n_layers)}
    try:
        model.run(tokens, probes=points, save=name, return_logits=False)
        handle = model.save_context(name)
        rows = []
        for layer in range(model.n_layers):
            p = handle.fetch(f"p{layer}")[0].double()  # (batch, head, q, k)
            q = torch.arange(half, 2 * half)
            rows.append(p[:, :, q, q - half + 1].mean((0, 2)).numpy())
    finally:
        model.save_context(name).clear()
    return np.stack(rows)


def point_activations(model: Any, point: str, limit: int) -> np.ndarray:
    """(examples, seq, units) activations at ``point`` over the first ``limit`` held-out
    examples (all of the same length)."""
    name = "test-ui/acts"
    try:
        model.run_dataset("default:heldout", probes={point: lambda c, x: c.save(
            "x", x.flatten(2).double())}, save=name, limit=limit, progress=False)
        acts = model.save_context(name).fetch("x", "list")
    finally:
        model.save_context(name).clear()
    return torch.cat(list(acts)).numpy()


def _page_numbers(model: Any, acts: np.ndarray, index: int, effect: torch.Tensor, k: int
                  ) -> dict[str, Any]:
    """A unit or feature page's numbers from the activations ``acts`` (examples, positions,
    units) of the page's unit ``index`` and its direct effect on the logits."""
    v = acts[..., index]
    masked = v.copy()
    masked[:, :SKIP_FIRST] = -np.inf
    best_pos = masked.argmax(1)
    best = masked[np.arange(len(v)), best_pos]
    order = np.argsort(-best, kind="stable")[:k]
    flat = acts.reshape(-1, acts.shape[-1])
    with np.errstate(divide="ignore", invalid="ignore"):  # features that never fire
        r = np.corrcoef(flat.T)[index]
    r[index] = np.nan
    top_corr = int(np.nanargmax(r))
    return {
        "count": v.size, "max": float(v.max()), "min": float(v.min()),
        "mean": float(v.mean()), "density": float((v > 0).mean()),
        "top": [(int(i), int(best_pos[i]), float(best[i])) for i in order],
        "corr_unit": top_corr, "corr_r": float(r[top_corr]),
        "promotes": model.to_str_tokens(effect.topk(5).indices),
        "promotes_values": effect.topk(5).values.tolist(),
    }


def unit_expectations(model: Any, point: str, unit: int, limit: int, k: int = 12
                      ) -> dict[str, Any]:
    w_out = model.param(f"layers.{point.split('.')[1]}.mlp.W_out")[unit].double()
    effect = w_out @ model.param("unembed.W_U").double()
    return _page_numbers(model, point_activations(model, point, limit), unit, effect, k)


def text_expectations(model: Any, text: str) -> dict[str, Any]:
    ids = model.tokenize(text)
    name = "test-ui/text"
    points = {f"layers.{i}.attn.pattern": (lambda c, x: c.save(f"p{c.layer}", x))
              for i in range(model.n_layers)}
    try:
        out = model.run(ids, probes=points, save=name)
        handle = model.save_context(name)
        patterns = [handle.fetch(f"p{i}")[0][0].double().numpy() for i in range(model.n_layers)]
    finally:
        model.save_context(name).clear()
    logprobs = torch.log_softmax(out.logits[0].double(), -1)
    loss = -logprobs[:-1].gather(-1, ids[1:, None])[:, 0]
    return {"tokens": model.to_str_tokens(ids), "loss": loss.numpy(),
            "mean_loss": float(loss.mean()),
            "final_top": model.to_str_tokens(logprobs.argmax(-1)), "patterns": patterns}


def text_unit_values(model: Any, point: str, unit: int, text: str) -> list[float]:
    name = "test-ui/try"
    try:
        model.run(text, probes={point: lambda c, x: c.save("v", x.flatten(2)[0, :, unit])},
                  save=name)
        return model.save_context(name).fetch("v")[0].double().tolist()
    finally:
        model.save_context(name).clear()


def zero_head(head: int) -> Any:
    def probe(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, :, head] = 0
        return y

    return probe


def intervene_expectations(model: Any, prompt: str, layer: int, head: int,
                           new_tokens: int) -> dict[str, Any]:
    probes = {f"layers.{layer}.attn.z": zero_head(head)}
    clean = torch.softmax(model.run(prompt).logits[0, -1].double(), -1)
    edited = torch.softmax(model.run(prompt, probes=probes).logits[0, -1].double(), -1)
    return {"clean_top": model.to_str_tokens(clean.topk(3).indices),
            "clean_p": clean.topk(3).values.tolist(),
            "edited_top": model.to_str_tokens(edited.topk(3).indices),
            "edited_p": edited.topk(3).values.tolist(),
            "clean_text": model.generate(prompt, new_tokens).new_text,
            "edited_text": model.generate(prompt, new_tokens, probes=probes).new_text}


def ov_positive_share(model: Any, layer: int, head: int) -> float:
    """sum(Re λ) / sum(|λ|) over the eigenvalues of W_E W_V W_O W_U, from the weights (its
    nonzero eigenvalues are those of W_O W_U W_E W_V)."""
    w_e = model.param("embed.W_E").double()
    w_u = model.param("unembed.W_U").double()
    w_v = model.param(f"layers.{layer}.attn.W_V", index=head).double()
    w_o = model.param(f"layers.{layer}.attn.W_O", index=head).double()
    eig = torch.linalg.eigvals(w_o @ w_u @ w_e @ w_v)
    return float(eig.real.sum() / eig.abs().sum())


def repeated_loss(model: Any, layer: int, head: int, half: int = 32) -> tuple[float, float]:
    """Mean loss on the second copy of head_scores' repeated tokens, clean and with the head
    zeroed."""
    import cloche

    tokens = cloche.experiments.repeated_tokens(model, half=half)
    out = []
    for probes in ({}, {f"layers.{layer}.attn.z": zero_head(head)}):
        logits = model.run(tokens, probes=probes).logits.double()
        logprobs = torch.log_softmax(logits[:, half:-1], -1)
        target = tokens[:, half + 1:]
        out.append(float(-logprobs.gather(-1, target[..., None]).mean()))
    return out[0], out[1]


def random_dictionary(d_in: int, d_sae: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small standard (ReLU) dictionary with random weights: the features are real probe
    points whatever the weights, and the test knows its ``W_dec`` without asking cloche."""
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
            "b_enc": torch.randn(d_sae, generator=g) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
            "b_dec": torch.randn(d_in, generator=g) * 0.1}


def feature_expectations(model: Any, point: str, feature: int, w_dec: torch.Tensor, limit: int,
                         k: int = 12) -> dict[str, Any]:
    """The feature page's numbers from the feature activations (a probe that saves them) and
    the dictionary's own ``W_dec`` row times ``W_U``."""
    effect = w_dec[feature].double() @ model.param("unembed.W_U").double()
    return _page_numbers(model, point_activations(model, point, limit), feature, effect, k)
