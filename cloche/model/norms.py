"""Inside a normalisation module: the scale and the normalised input, before the norm's weight.

TransformerLens names two quantities inside every LayerNorm/RMSNorm: ``hook_scale``, the
denominator ``sqrt(mean(x²) + eps)`` (of the centred x for a LayerNorm), shape
``(batch, seq, 1)``, and ``hook_normalized``, the (centred) input divided by it, *before* the
norm's weight and bias. cloche offers them as ``ln1.scale`` / ``ln1.normalized`` (and ``ln2.*``,
``final_norm.*``) for the norm modules it recognises here; the norm's output (after its
weight) stays ``ln1``. A probe that replaces either one changes the norm's output: it is
recomputed from the replaced values with the module's own weight and bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NormKind:
    centred: bool  # LayerNorm (subtracts the mean) or RMSNorm
    offset: bool  # the weight is stored as an offset from 1 (Gemma's RMSNorm)
    eps: float


def norm_kind(module: nn.Module) -> NormKind | None:
    """How ``module`` normalises, or None when cloche does not recognise it."""
    if isinstance(module, nn.LayerNorm):
        return NormKind(centred=True, offset=False, eps=float(module.eps))
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not name.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or weight.ndim != 1:
        return None
    eps = getattr(module, "variance_epsilon", None)
    if eps is None:
        eps = getattr(module, "eps", None)
    if not isinstance(eps, float | int):
        return None
    # Gemma's RMSNorms (1, 2, 3) multiply by (1 + weight); Llama's and its relatives by weight
    return NormKind(centred=False, offset=name.startswith("Gemma"), eps=float(eps))


def split(kind: NormKind, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(centred x, scale)`` in float32 at least, as TransformerLens computes them."""
    xf = x.float() if x.dtype not in (torch.float32, torch.float64) else x
    if kind.centred:
        xf = xf - xf.mean(-1, keepdim=True)
    scale = (xf.pow(2).mean(-1, keepdim=True) + kind.eps).sqrt()
    return xf, scale


def recombine(kind: NormKind, module: nn.Module, normalized: torch.Tensor,
              dtype: torch.dtype) -> torch.Tensor:
    """The norm's output from its normalised input: the module's weight (and bias) applied."""
    weight = getattr(module, "weight", None)
    out = normalized
    if isinstance(weight, torch.Tensor):
        out = out * (1.0 + weight.float() if kind.offset else weight)
    bias = getattr(module, "bias", None)
    if kind.centred and isinstance(bias, torch.Tensor):
        out = out + bias
    return out.to(dtype)
