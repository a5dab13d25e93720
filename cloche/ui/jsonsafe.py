"""Values as JSON can hold them: NaN and infinities become None (JSON has no such numbers)."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["clean"]


def clean(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (dicts, lists, tuples walked)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
