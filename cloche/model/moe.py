"""Mixture-of-experts points: the router's logits and each expert's hidden activations.

transformers keeps a block's experts as 3D parameters looped over inside one module, so no
module per expert exists to hook. For a run that probes ``layers.i.mlp.experts.e.post``,
cloche replaces that experts module's ``forward`` (an instance attribute, removed after the
run) with the same loop written out here, with a tap between each expert's activation and its
down projection. An expert's ``post`` is (batch, seq, d_expert): its activations at the tokens
routed to it, zero at the others (where a replacement is ignored: those tokens never reach it).

A replaced ``mlp.router`` (router logits) re-routes: top-k experts and their weights are
recomputed from the new logits as the router does (softmax, top-k, renormalised when the router
renormalises), so the replacement decides which experts run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from cloche.errors import UsageError

__all__ = ["expert_taps", "reroute"]


def reroute(router: Any, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, top-k weights, top-k experts)`` as ``router`` computes them from ``logits``."""
    probs = nn.functional.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, int(router.top_k), dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), experts


def _tapped_forward(module: nn.Module, layer: int,
                    apply: Callable[[int, int, torch.Tensor], torch.Tensor]
                    ) -> Callable[..., torch.Tensor]:
    experts: Any = module
    if (getattr(experts, "is_transposed", False) or getattr(experts, "has_bias", False)
            or not getattr(experts, "has_gate", True)
            or not getattr(experts, "is_concatenated", True)):
        raise UsageError(f"the experts of layer {layer} ({type(module).__name__}) use a weight"
                         " layout cloche cannot tap yet (transposed, biased, ungated or"
                         " interleaved)")

    def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        n_tokens = hidden_states.shape[0]
        for e in range(int(experts.num_experts)):
            # k-major order, as transformers' own loop
            top_k_pos, token_idx = torch.where((top_k_index == e).T)
            gate_up = nn.functional.linear(hidden_states[token_idx], experts.gate_up_proj[e])
            h = experts._apply_gate(gate_up)
            dense = h.new_zeros(n_tokens, h.shape[-1]).index_copy(0, token_idx, h)
            h = apply(layer, e, dense)[token_idx]
            out = nn.functional.linear(h, experts.down_proj[e])
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    return forward


@contextlib.contextmanager
def expert_taps(modules: dict[int, nn.Module],
                apply: Callable[[int, int, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Run the experts modules ``{layer: module}`` through the tapped loop for the duration.

    ``apply(layer, expert, post)`` sees (tokens, d_expert) and returns it or a replacement.
    """
    try:
        for layer, module in modules.items():
            # an instance attribute shadows the class's forward; deleting it restores it
            module.__dict__["forward"] = _tapped_forward(module, layer, apply)
        yield
    finally:
        for module in modules.values():
            module.__dict__.pop("forward", None)
