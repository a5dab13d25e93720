"""Comparing tensors with a tolerance, and capturing probe points through the public API."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from cloche.check.report import FAIL, PASS, Row, summarize_points

__all__ = ["ATOL", "RTOL", "capture", "compare", "max_diff", "tolerance"]

#: float32 activations: what the parity tests allow (sums taken in another order, another kernel)
ATOL, RTOL = 1e-5, 1e-5
#: half precision: this many units of the dtype's epsilon, relative to the largest value
HALF_EPS = 8


def tolerance(reference: torch.Tensor, *, atol: float = ATOL, rtol: float = RTOL) -> float:
    """The largest absolute difference allowed against ``reference``: ``atol + rtol * max|ref|``
    in float32 (and wider), ``HALF_EPS * eps * max|ref|`` in half precision (a few rounding
    steps of the largest value: gradients, being small, get a small tolerance too)."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 0.0
    if reference.dtype in (torch.float16, torch.bfloat16):
        return HALF_EPS * torch.finfo(reference.dtype).eps * scale
    return atol + rtol * scale


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest absolute difference (in float64: half-precision inputs do not round it)."""
    if got.numel() == 0:
        return 0.0
    diff = (got.detach().cpu().double() - want.detach().cpu().double()).abs()
    return float(diff.nan_to_num(nan=float("inf")).max())


def compare(check: str, pairs: Sequence[tuple[str, torch.Tensor, torch.Tensor]], *,
            exact: bool = False, atol: float = ATOL, rtol: float = RTOL,
            points: str | None = None) -> Row:
    """One row for ``(point, got, want)`` pairs: the worst difference against the tolerance
    (``exact``: bit-equal). A shape mismatch fails and names the point."""
    label = points or summarize_points(n for n, _, _ in pairs)
    results = []  # (diff, allowed, name, exceeded)
    for name, got, want in pairs:
        if tuple(got.shape) != tuple(want.shape):
            return Row(check=check, points=label, n_points=len(pairs), status=FAIL,
                       reason=f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}")
        diff = max_diff(got, want)
        allowed = 0.0 if exact else tolerance(want, atol=atol, rtol=rtol)
        exceeded = diff > allowed or (exact and not torch.equal(got.cpu(), want.cpu()))
        results.append((diff, allowed, name, exceeded))
    failing = [r for r in results if r[3]]
    diff, allowed, _, _ = max(failing or results or [(0.0, 0.0, "", False)])
    reason = ""
    if failing:
        names = [r[2] for r in failing]
        reason = "differs at " + ", ".join(names[:3]) + (
            f" and {len(names) - 3} more" if len(names) > 3 else "")
    return Row(check=check, points=label, n_points=len(pairs), max_diff=diff,
               tolerance=allowed, status=FAIL if failing else PASS, reason=reason)


def _saver(ctx: Any, x: torch.Tensor) -> None:
    ctx.save(ctx.point, x)


def capture(model: Any, inputs: Any, names: Sequence[str], *,
            probes: Mapping[str, Callable[..., Any]] | None = None,
            context: str = "cloche-check") -> dict[str, torch.Tensor]:
    """What each point in ``names`` held during one run of ``inputs`` (with ``probes`` that
    may change the run, applied before the savers), through the public API alone."""
    handle = model.save_context(context)
    handle.clear()
    plan: dict[str, list[Callable[..., Any]]] = {}
    for name, fn in (probes or {}).items():
        plan.setdefault(model.resolve(name), []).append(fn)
    for name in names:
        plan.setdefault(model.resolve(name), []).append(_saver)
    try:
        model.run(inputs, probes=plan, save=context)
        return {name: handle.fetch(model.resolve(name))[0] for name in names}
    finally:
        handle.clear()
