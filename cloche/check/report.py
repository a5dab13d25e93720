"""The result of a check: one :class:`Row` per relation checked, printed as a table or JSON."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["FAIL", "PASS", "SKIP", "Report", "Row", "summarize_points"]

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True, kw_only=True)
class Row:
    """One relation checked: which points it covers, how far apart the two sides were, the
    tolerance, and PASS / FAIL / SKIP with the reason (for FAIL and SKIP)."""

    check: str
    points: str = ""
    n_points: int = 0
    max_diff: float | None = None
    tolerance: float | None = None
    status: str = PASS
    reason: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass(kw_only=True)
class Report:
    """Every row of one ``cloche check``, and what was checked (model, inputs, dtype)."""

    model: str
    details: dict[str, Any] = field(default_factory=dict)
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no row failed (skipped rows do not fail a check)."""
        return not any(row.failed for row in self.rows)

    def counts(self) -> dict[str, int]:
        return {status: sum(row.status == status for row in self.rows)
                for status in (PASS, FAIL, SKIP)}

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, **self.details, "ok": self.ok, "counts": self.counts(),
                "rows": [asdict(row) for row in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The rows as a plain-text table, then one summary line."""
        header = ("check", "points", "max |diff|", "tolerance", "result")
        body = [(row.check, row.points, _number(row.max_diff), _number(row.tolerance),
                 row.status + (f": {row.reason}" if row.reason else "")) for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(4)]
        lines = []
        for line in [header, *body]:
            cells = [line[0].ljust(widths[0]), line[1].ljust(widths[1]),
                     line[2].rjust(widths[2]), line[3].rjust(widths[3]), line[4]]
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * w for w in [*widths, len(header[4])]))
        counts = self.counts()
        verdict = "OK" if self.ok else "FAILED"
        lines.append(f"{verdict}: {counts[PASS]} passed, {counts[FAIL]} failed,"
                     f" {counts[SKIP]} skipped")
        return "\n".join(lines)


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.2e}"


_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def summarize_points(names: Iterable[str]) -> str:
    """``layers.0.resid_pre, layers.1.resid_pre, final_norm`` -> ``layers.*.resid_pre (2),
    final_norm``: block points grouped by what they are, in first-seen order."""
    groups: dict[str, int] = {}
    for name in names:
        match = _LAYER.match(name)
        key = f"layers.*.{match.group(2)}" if match else name
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{key} ({n})" if key.startswith("layers.*") else key
                     for key, n in groups.items())


def many(names: Sequence[str], limit: int = 4) -> str:
    """A short description of a long list of points."""
    text = summarize_points(names)
    groups = text.count(", ") + 1 if text else 0
    return text if groups <= limit else f"{len(names)} points ({groups} kinds)"
