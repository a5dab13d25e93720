"""The JumpReLU's training-time gradients (Rajamanoharan et al. 2024, "Jumping Ahead").

A JumpReLU feature is ``pre * H(pre - threshold)``; the step ``H`` has no useful derivative with
respect to the threshold, so training uses a straight-through estimator: in the backward pass
the step's derivative is replaced by a rectangle kernel of width ``bandwidth`` around the
threshold. :class:`JumpReLU` is the activation (its input gets the ordinary gradient where the
feature is on, its threshold the kernel's), :class:`Step` the L0 count ``H(pre - threshold)``
(the threshold alone gets a gradient, so the L0 penalty moves thresholds, not encoders). This
is what SAELens' ``JumpReLUTrainingSAE`` does with ``jumprelu_sparsity_loss_mode="step"`` and
``jumprelu_ste_to_input=False`` (DeepMind's setup).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["JumpReLU", "Step"]


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``, with the kernel's gradient for ``threshold``."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor,
                bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (grad,) = grads
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        kernel = _rectangle((pre - threshold) / bandwidth)
        threshold_grad = -(threshold / bandwidth) * kernel * grad
        return ((pre > threshold).to(grad.dtype) * grad,
                threshold_grad.reshape(-1, threshold.shape[-1]).sum(0), None)


class Step(torch.autograd.Function):
    """``(pre > threshold)`` as numbers, with the kernel's gradient for ``threshold`` only."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor,
                bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        (grad,) = grads
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        threshold_grad = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * grad
        return None, threshold_grad.reshape(-1, threshold.shape[-1]).sum(0), None
