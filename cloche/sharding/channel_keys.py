"""The names of point-to-point messages: both ends compute the same key from the same facts."""

from __future__ import annotations

__all__ = ["keys"]


class _Keys:
    @staticmethod
    def act(seq: int, n: int, src: int, dst: int) -> str:
        return f"{seq}/{n}/act/{src}>{dst}"

    @staticmethod
    def step(seq: int, n: int, src: int, dst: int) -> str:
        """One decode step of a sharded generation: its inputs and the hidden state (or stop)."""
        return f"{seq}/{n}/step/{src}>{dst}"

    @staticmethod
    def grad(seq: int, n: int, src: int, dst: int) -> str:
        return f"{seq}/{n}/grad/{src}>{dst}"

    @staticmethod
    def logits(seq: int, n: int, dst: int) -> str:
        return f"{seq}/{n}/logits/{dst}"

    @staticmethod
    def final_logits(seq: int) -> str:
        return f"{seq}/logits"

    @staticmethod
    def tied(seq: int, name: str, src: int) -> str:
        return f"{seq}/tied/{name}/{src}"

    @staticmethod
    def light(rank: int, n: int) -> str:
        return f"L{rank}/{n}/light"

    @staticmethod
    def result(seq: int, rank: int) -> str:
        return f"{seq}/res/{rank}"


keys = _Keys()
