"""The contract every reducer keeps, and the plumbing they share.

A reducer is a mergeable statistic: a probe feeds it activations batch by batch
(``update``), and partial reducers built on other batches, runs or ranks combine with
``merge``. Because the merge is the same code whatever the partial came from, a sharded run
and a single-process run end with the same numbers.

State lives on the device of the first activations it saw and is kept in float64, whatever
the input dtype, so that millions of tokens can be summed without drift. ``result()`` hands
back CPU tensors. ``state_dict()`` is a flat dict of tensors and plain values (the wire codec
sends the tensors as raw buffers; persistence writes them to safetensors), and
``reducer_from_state`` rebuilds the right class from it through the registry below.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from cloche.errors import UsageError

__all__ = ["REDUCERS", "Reducer"]

#: kind -> class, filled in by ``Reducer.__init_subclass__``.
REDUCERS: dict[str, type[Reducer]] = {}


class Reducer(ABC):
    """A mergeable statistic over the units (last dimension) of activations.

    Subclasses set ``kind`` (the registry key), implement the config / state hooks and the
    three numeric steps (``_update_rows``, ``_merge_state``, ``_result``); the base class
    handles shapes, masks, devices, the fixed unit count ``d`` and (de)serialisation.
    """

    kind: ClassVar[str]
    #: constructor arguments, stored as attributes of the same names; they make the config.
    _config_keys: ClassVar[tuple[str, ...]] = ()
    #: state tensors whose first dimension grows with the data (TopK's kept rows).
    _growing: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is None:
            return
        if kind in REDUCERS and REDUCERS[kind] is not cls:
            raise UsageError(f"reducer kind {kind!r} is already registered by {REDUCERS[kind]!r}")
        REDUCERS[kind] = cls

    def __init__(self) -> None:
        self._d: int | None = None
        self._count = 0
        self._state: dict[str, torch.Tensor] = {}

    # ----- configuration -------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The constructor arguments (plain values); two reducers merge only if these match."""
        return {k: getattr(self, k) for k in self._config_keys}

    @abstractmethod
    def _init_state(self, d: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Zero state for ``d`` units on ``device``."""

    # ----- numeric steps -------------------------------------------------------------------
    @abstractmethod
    def _update_rows(self, rows: torch.Tensor, n: int) -> None:
        """Fold ``rows`` (n, d), already masked and on the state's device, into the state.

        ``rows`` keeps the input's dtype; ``n`` ≥ 1; ``self._count`` still holds the old count.
        """

    @abstractmethod
    def _merge_state(self, other: dict[str, torch.Tensor], n_other: int) -> None:
        """Fold another reducer's state (same d, same device, ``n_other`` ≥ 1 rows) into self."""

    @abstractmethod
    def _result(self) -> dict[str, torch.Tensor]:
        """The statistics from the state (``self._count`` may be 0: NaNs or empties, no error)."""

    # ----- public API ----------------------------------------------------------------------
    @property
    def d(self) -> int | None:
        """Number of units, fixed by the first update (``None`` before it)."""
        return self._d

    @property
    def count(self) -> int:
        """Number of samples (unmasked rows) folded in so far."""
        return self._count

    @property
    def device(self) -> torch.device | None:
        """Where the state lives (``None`` while the reducer has no state)."""
        for t in self._state.values():
            return t.device
        return None

    def update(
        self,
        x: torch.Tensor,
        *,
        example_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Fold activations ``x`` of shape (..., d) into the statistic.

        Every leading dimension of ``x`` indexes samples; ``mask`` (bool, ``x``'s leading shape)
        marks the rows to keep — ``False`` rows (padding) are ignored. ``example_ids`` is only
        used by reducers that remember where values came from (``TopK``).
        """
        del example_ids  # only TopK needs them
        rows = self._rows(x, mask)
        if rows.shape[0]:
            self._update_rows(rows, rows.shape[0])
            self._count += rows.shape[0]

    def merge(self, other: Reducer) -> Reducer:
        """Fold ``other`` into this reducer (in place) and return ``self``.

        ``other`` is left unchanged and may live on another device: its state is moved to
        this reducer's device. An empty reducer on either side acts as the identity.
        """
        self._check_compatible(other)
        if other._d is None:
            return self
        if self._d is None:
            self._d = other._d
            self._state = {k: v.clone() for k, v in other._state.items()}
            self._count = other._count
            return self
        if other._d != self._d:
            raise UsageError(
                f"cannot merge {self._describe()} with {other._describe()}: "
                f"they hold different numbers of units ({self._d} != {other._d})"
            )
        if other._count:
            device = self.device
            state = {k: v.to(device) for k, v in other._state.items()}
            self._merge_state(state, other._count)
            self._count += other._count
        return self

    def result(self) -> dict[str, torch.Tensor]:
        """The statistics as CPU tensors (float64 for values, int64 for counts and ids)."""
        source = self
        if self._d is None:  # nothing seen: report zero units
            source = self.empty_like()
            source._state = source._init_state(0, torch.device("cpu"))
        return {k: v.cpu() for k, v in source._result().items()}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this reducer: tensors plus plain values.

        Keys: ``kind``, the config values, ``d`` and ``count`` (plain ints or ``None``), and the
        state tensors (absent while ``d`` is ``None``).
        """
        out: dict[str, Any] = {
            "kind": self.kind,
            **self.config(),
            "d": self._d,
            "count": self._count,
        }
        out.update(self._state)
        return out

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Reducer:
        """Rebuild a reducer of this class from ``state_dict()`` output."""
        kind = state.get("kind")
        if kind != cls.kind:
            raise UsageError(
                f"state of kind {kind!r} cannot rebuild a {cls.__name__} (kind {cls.kind!r})"
            )
        config = {}
        for name in cls._config_keys:
            if name not in state:
                raise UsageError(f"{cls.__name__} state lacks config value {name!r}")
            config[name] = state[name]
        reducer = cls(**config)
        d, count = state.get("d"), state.get("count", 0)
        if d is None:
            if count:
                raise UsageError(f"{cls.__name__} state has count {count} but no d")
            return reducer
        if not isinstance(d, int) or isinstance(d, bool) or d < 1:
            raise UsageError(f"{cls.__name__} state has invalid d {d!r}")
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UsageError(f"{cls.__name__} state has invalid count {count!r}")
        template = reducer._init_state(d, torch.device("cpu"))
        loaded: dict[str, torch.Tensor] = {}
        for name, zero in template.items():
            t = state.get(name)
            if not isinstance(t, torch.Tensor):
                raise UsageError(f"{cls.__name__} state lacks tensor {name!r}")
            fixed = slice(1, None) if name in cls._growing else slice(None)
            if t.dim() != zero.dim() or t.shape[fixed] != zero.shape[fixed]:
                raise UsageError(
                    f"{cls.__name__} state tensor {name!r} has shape "
                    f"{tuple(t.shape)}, expected {tuple(zero.shape)}"
                )
            loaded[name] = t.to(dtype=zero.dtype)
        devices = {t.device for t in loaded.values()}
        if len(devices) > 1:
            raise UsageError(f"{cls.__name__} state tensors are on several devices: {devices}")
        reducer._d, reducer._count, reducer._state = d, count, loaded
        reducer._check_loaded()
        return reducer

    def empty_like(self) -> Reducer:
        """A reducer with the same config and no data (not even a fixed ``d``)."""
        return type(self)(**self.config())

    def to(self, device: torch.device | str) -> Reducer:
        """Move the state to ``device`` (in place) and return ``self``."""
        self._state = {k: v.to(device) for k, v in self._state.items()}
        return self

    @property
    def nbytes(self) -> int:
        """Bytes held by the state tensors (a property, as on tensors, arrays and handles)."""
        return sum(t.numel() * t.element_size() for t in self._state.values())

    def __repr__(self) -> str:
        args = [f"{k}={v!r}" for k, v in self.config().items()]
        args += [f"d={self._d}", f"count={self._count}"]
        return f"{type(self).__name__}({', '.join(args)})"

    # ----- helpers for subclasses ----------------------------------------------------------
    def _check_loaded(self) -> None:  # noqa: B027 - an optional hook: by default, no checks
        """Extra consistency checks on a state loaded by ``from_state_dict``."""

    def _describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def _check_compatible(self, other: Reducer) -> None:
        if not isinstance(other, Reducer):
            raise UsageError(
                f"cannot merge {self._describe()} with {type(other).__name__!s}: not a reducer"
            )
        if type(other) is not type(self) or other.config() != self.config():
            raise UsageError(
                f"cannot merge {self._describe()} with {other._describe()}: "
                "reducers differ in kind or configuration"
            )

    def _rows(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Validate ``x``/``mask``, fix ``d`` and return the kept rows as (n, d) on our device."""
        if not isinstance(x, torch.Tensor):
            raise UsageError(
                f"{self._describe()}.update expects a torch.Tensor, got {type(x).__name__}"
            )
        if x.dim() < 1:
            raise UsageError(
                f"{self._describe()}.update expects x of shape (..., d), got a 0-d tensor"
            )
        if x.is_complex():
            raise UsageError(f"{self._describe()}.update does not take complex tensors")
        d = x.shape[-1]
        self._fix_d(d, x.device)
        rows = x.reshape(-1, d)
        if not rows.is_floating_point():
            rows = rows.to(torch.float64)
        rows = rows.to(self.device)
        if mask is not None:
            keep = self._mask(mask, x.shape[:-1]).to(rows.device)
            rows = rows[keep.reshape(-1)]
        return rows

    def _mask(self, mask: torch.Tensor, lead: torch.Size) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise UsageError(
                f"{self._describe()}.update: mask must be a bool tensor, got "
                f"{getattr(mask, 'dtype', type(mask).__name__)}"
            )
        if mask.shape != lead:
            raise UsageError(
                f"{self._describe()}.update: mask has shape {tuple(mask.shape)}, "
                f"expected x's leading shape {tuple(lead)}"
            )
        return mask

    def _fix_d(self, d: int, device: torch.device) -> None:
        if self._d is None:
            if d < 1:
                raise UsageError(f"{self._describe()}.update: x has no units (last dim is 0)")
            self._state = self._init_state(d, device)
            self._d = d
        elif d != self._d:
            raise UsageError(
                f"{self._describe()}.update: x has {d} units in its last dim, but "
                f"this reducer was started with d={self._d}"
            )


def check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    """An int argument ≥ ``minimum`` (bools refused), or a UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{owner}: {name} must be an int, got {value!r}")
    if value < minimum:
        raise UsageError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return value


def check_float(owner: str, name: str, value: Any) -> float:
    """A finite real number argument, as a float, or a UsageError naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UsageError(f"{owner}: {name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise UsageError(f"{owner}: {name} must be finite, got {value}")
    return value
