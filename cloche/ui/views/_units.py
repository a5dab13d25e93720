"""Parsing what the URL calls a unit, and reading it inside a probe.

A unit is an index into a point's trailing dimensions (flattened, as in
``cloche.experiments``: unit ``h * d_head + j`` of ``attn.z``) or a direction: a comma-separated
list of floats as long as those dimensions. Nothing here evaluates user text as code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cloche.errors import UsageError

__all__ = ["Unit", "parse_unit", "point_width", "unit_values"]


@dataclass(frozen=True)
class Unit:
    """One unit (``index``) or one direction (``direction``, a float list)."""

    index: int | None = None
    direction: tuple[float, ...] | None = None

    @property
    def key(self) -> str:
        """A short stable text for caches and titles."""
        if self.index is not None:
            return str(self.index)
        assert self.direction is not None
        return "dir:" + ",".join(f"{v:.6g}" for v in self.direction)

    def tensor(self) -> torch.Tensor | None:
        return None if self.direction is None else torch.tensor(self.direction,
                                                                dtype=torch.float32)


def parse_unit(unit: str | None, direction: str | None) -> Unit:
    """``unit=7`` or ``direction=0.1,0,-2``: exactly one of them."""
    if (unit in (None, "")) == (direction in (None, "")):
        raise UsageError("give unit=<int> or direction=<comma-separated floats>, exactly one")
    if unit not in (None, ""):
        try:
            index = int(str(unit))
        except ValueError:
            raise UsageError(f"unit must be an int, not {unit!r}") from None
        if index < 0:
            raise UsageError(f"unit must be >= 0, not {index}")
        return Unit(index=index)
    try:
        values = tuple(float(v) for v in str(direction).split(","))
    except ValueError:
        raise UsageError("direction must be comma-separated floats") from None
    if not all(abs(v) < float("inf") for v in values) or not any(values):
        raise UsageError("a direction needs finite values, not all zero")
    return Unit(direction=values)


def point_width(model: Any, point: str) -> int:
    """Units at ``point``: the product of its trailing (non-batch, non-seq) sizes."""
    for p in model.probe_points():
        if p.name == point:
            shape = tuple(p.shape)
            if len(shape) < 3 or shape[:2] != ("batch", "seq") or not all(
                    isinstance(s, int) for s in shape[2:]):
                raise UsageError(f"{point} has shape {shape}: unit pages need a (batch, seq, ...)"
                                 " point")
            width = 1
            for s in shape[2:]:
                width *= int(s)
            return width
    raise UsageError(f"unknown probe point {point!r}")


def check_unit(unit: Unit, width: int, point: str) -> None:
    if unit.index is not None and unit.index >= width:
        raise UsageError(f"unit {unit.index} is out of range: {point} has {width} units")
    if unit.direction is not None and len(unit.direction) != width:
        raise UsageError(f"the direction has {len(unit.direction)} entries, {point} has"
                         f" {width} units")


def unit_values(x: torch.Tensor, index: int | None, direction: torch.Tensor | None
                ) -> torch.Tensor:
    """(batch, seq, ...) activations -> (batch, seq) float64 values of the unit (in probes)."""
    flat = x.flatten(2).double()
    if direction is not None:
        return flat @ direction.to(flat)
    return flat[..., index]
