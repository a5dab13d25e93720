"""The intervene page: zero, scale or steer a unit, a head or a direction, next to a clean run.

The edit is a probe that returns a replacement tensor (PyTorch's hook convention), built here
from a few typed values — a point, an index or a direction, an operation and a factor — never
from user code. The page compares the next-token distribution at the prompt's last position
and the greedy continuation, with and without the edit.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import torch

from cloche.errors import UsageError

__all__ = ["OPERATIONS", "Edit", "edit_probe", "intervene_page"]

OPERATIONS = ("zero", "scale", "steer")
MAX_NEW_TOKENS = 40


@dataclass(frozen=True)
class Edit:
    """What to change: at ``point``, a ``unit`` (flattened index), a ``head`` (the head axis of a
    per-head point) or a ``direction``; ``op`` zero/scale (by ``factor``) or steer (add
    ``factor`` times the direction, or times the unit's basis vector)."""

    point: str
    op: str
    factor: float = 0.0
    unit: int | None = None
    head: int | None = None
    direction: tuple[float, ...] | None = None

    def describe(self) -> str:
        what = (f"unit {self.unit}" if self.unit is not None else
                f"head {self.head}" if self.head is not None else "a direction")
        how = {"zero": "zeroed", "scale": f"scaled by {self.factor:g}",
               "steer": f"steered by {self.factor:g}"}[self.op]
        return f"{self.point}: {what} {how}"


def edit_probe(edit: Edit, head_axis: int | None) -> Any:
    """A probe ``fn(ctx, x)`` that returns ``x`` with ``edit`` applied."""
    op, factor = edit.op, (0.0 if edit.op == "zero" else float(edit.factor))
    unit, head = edit.unit, edit.head
    direction = None if edit.direction is None else torch.tensor(edit.direction)

    def intervention(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        if head is not None:
            index: list[Any] = [slice(None)] * y.dim()
            index[head_axis if head_axis is not None else 2] = head
            if op == "steer":
                raise ValueError("steering takes a unit or a direction, not a head")
            y[tuple(index)] *= factor
            return y
        flat = y.flatten(2)
        if direction is not None:
            d = direction.to(flat)
            if op == "steer":
                flat += factor * d
            else:  # zero / scale the component along the direction
                unit_d = d / d.norm()
                along = (flat @ unit_d)[..., None] * unit_d
                flat += (factor - 1.0) * along
        elif op == "steer":
            flat[..., unit] += factor
        else:
            flat[..., unit] *= factor
        return flat.reshape(x.shape)

    return intervention


def _head_axis(model: Any, point: str) -> tuple[int | None, int]:
    """(axis of heads, width) of ``point``: heads are the axis of size n_heads after
    (batch, seq) for q/k/v/z/result, or axis 1 for (batch, head, q, k) patterns."""
    for p in model.probe_points():
        if p.name == point:
            shape = tuple(p.shape or ())
            width = 1
            for s in shape[2:]:
                width *= s if isinstance(s, int) else 1
            if len(shape) == 4 and shape[0] == "batch" and shape[2] == "seq":
                return 1, width
            if len(shape) == 4 and shape[:2] == ("batch", "seq"):
                return 2, width
            return None, width
    raise UsageError(f"unknown probe point {point!r}")


def _distribution(logits: torch.Tensor, tokenizer: Any, model: Any, k: int
                  ) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(k)
    strs = model.to_str_tokens(top.indices)
    return probs, [{"token": t, "id": int(i), "p": float(p)}
                   for t, i, p in zip(strs, top.indices.tolist(), top.values.tolist(),
                                      strict=True)]


def intervene_page(model: Any, text: str, edit: Edit, *, max_new_tokens: int = 20,
                   k: int = 10) -> dict[str, Any]:
    """Next-token distributions and greedy continuations, clean and edited."""
    if not text:
        raise UsageError("type a prompt")
    if edit.op not in OPERATIONS:
        raise UsageError(f"op must be one of {OPERATIONS}, not {edit.op!r}")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise UsageError(f"max_new_tokens must lie in [1, {MAX_NEW_TOKENS}]")
    point = model.resolve(edit.point)
    head_axis, width = _head_axis(model, point)
    chosen = [v is not None for v in (edit.unit, edit.head, edit.direction)]
    if sum(chosen) != 1:
        raise UsageError("choose exactly one of unit, head or direction")
    if edit.unit is not None and not 0 <= edit.unit < width:
        raise UsageError(f"unit {edit.unit} is out of range: {point} has {width} units")
    if edit.head is not None and (head_axis is None or not 0 <= edit.head < int(model.n_heads)):
        raise UsageError(f"{point} has no head {edit.head}")
    if edit.direction is not None and len(edit.direction) != width:
        raise UsageError(f"the direction has {len(edit.direction)} entries, {point} has"
                         f" {width} units")
    probes = {point: edit_probe(Edit(point, edit.op, edit.factor, edit.unit, edit.head,
                                     edit.direction), head_axis)}
    ids = model.tokenize(text)
    scratch = f"ui/intervene/{uuid.uuid4().hex[:12]}"  # the runs leave no trace in "default"
    try:
        clean_logits = model.run(ids, save=scratch).logits[0, -1]
        edited_logits = model.run(ids, probes=probes, save=scratch).logits[0, -1]
        clean_gen = model.generate(ids, max_new_tokens, save=scratch)
        edit_gen = model.generate(ids, max_new_tokens, probes=probes, save=scratch)
    finally:
        model.save_context(scratch).clear()
    p_clean, clean_top = _distribution(clean_logits, model.tokenizer, model, k)
    p_edit, edit_top = _distribution(edited_logits, model.tokenizer, model, k)
    for row in clean_top:
        row["p_other"] = float(p_edit[row["id"]])
    for row in edit_top:
        row["p_other"] = float(p_clean[row["id"]])
    kl = float((p_clean * (p_clean.clamp_min(1e-300).log() - p_edit.clamp_min(1e-300).log()))
               .sum())
    return {
        "model": model.name, "prompt": text, "edit": edit.describe(), "point": point,
        "clean": {"top": clean_top, "continuation": _continuation(model, clean_gen)},
        "edited": {"top": edit_top, "continuation": _continuation(model, edit_gen)},
        "kl": kl,
    }


def _continuation(model: Any, result: Any) -> str:
    new = result.new_text
    if new is None:
        return model.decode(result.tokens[-1:])
    return str(new)
