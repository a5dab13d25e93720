"""Running the user's own code (shipped functions, loss functions) with errors that name it.

Probes are wrapped in ``runtime.hooks.call_probes``; the two other places user code runs — a
function given to ``call`` and a ``backward=`` loss function — go through here, on every rank
and every executor, so a failure always surfaces as :class:`~cloche.errors.ProbeError` naming
the function, with the original exception chained.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from cloche.api.results import Outputs
from cloche.errors import CallError, ClocheError, ProbeError, UsageError

__all__ = ["backward_objective", "qualname", "run_user_function"]


def qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def run_user_function(fn: Callable[..., Any], model: Any, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Any:
    """``fn(model, *args, **kwargs)``; anything but a cloche error becomes a CallError."""
    try:
        return fn(model, *args, **kwargs)
    except ClocheError:
        raise
    except Exception as exc:
        name = qualname(fn)
        raise CallError(f"function {name} raised {type(exc).__name__}: {exc}",
                        probe=name) from exc


def backward_objective(backward: Any, outputs: Outputs) -> torch.Tensor:
    """The scalar to backprop: the next-token loss (``backward=True``) or the user's function."""
    if backward is True:
        objective = outputs.loss
    else:
        try:
            value = backward(outputs)
        except ClocheError:
            raise
        except Exception as exc:
            name = qualname(backward)
            raise ProbeError(f"backward function {name} raised {type(exc).__name__}: {exc}",
                             probe=name) from exc
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise UsageError(f"the backward function must return a scalar tensor, got {value!r}")
        objective = value.reshape(())
    if objective is None:
        raise UsageError("nothing to backprop: the inputs have a single token")
    return objective
