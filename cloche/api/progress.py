"""Turn streamed request events (queued, started, progress) into a tqdm bar or a callback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["ProgressReporter"]


class ProgressReporter:
    """``progress=True``: a tqdm bar; a callable: called with every event dict (``type`` is
    ``"queued"`` with ``position``/``ahead``, ``"started"``, or ``"progress"`` with ``done``,
    ``total``, ``tokens``, ``elapsed``, ``eta``); ``False``/``None``: quiet."""

    def __init__(self, progress: bool | Callable[[dict[str, Any]], None] | None, desc: str) -> None:
        self._callback = progress if callable(progress) else None
        self._want_bar = progress is True
        self._desc = desc
        self._bar: Any = None

    def _ensure_bar(self) -> Any:
        if self._bar is None and self._want_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=None, unit="ex", desc=self._desc)
        return self._bar

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if self._callback is not None and kind in ("queued", "started", "progress"):
            self._callback(dict(event))
        if kind == "progress":
            bar = self._ensure_bar()
            if bar is not None:
                if event.get("total") is not None and bar.total != event["total"]:
                    bar.total = event["total"]
                bar.set_description(self._desc, refresh=False)
                done = int(event.get("done") or 0)
                bar.set_postfix(tokens=event.get("tokens"), refresh=False)
                bar.update(done - bar.n)
        elif kind == "queued":
            bar = self._ensure_bar()
            if bar is not None:
                ahead = event.get("ahead", event.get("position"))
                where = "next" if not ahead else f"{ahead} ahead"
                bar.set_description(f"{self._desc} (queued: {where})")
        elif kind == "started":
            bar = self._ensure_bar()
            if bar is not None:
                bar.set_description(self._desc)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
