"""Probe contexts, save contexts and mergeable reducers."""

from cloche.probes.context import ProbeContext
from cloche.probes.reducers import (
    Covariance,
    Histogram,
    Mean,
    MinMax,
    Reducer,
    TopK,
    Variance,
    reducer_from_state,
)
from cloche.probes.refs import TensorRef

__all__ = [
    "Covariance", "Histogram", "Mean", "MinMax", "ProbeContext", "Reducer",
    "TensorRef", "TopK", "Variance", "reducer_from_state",
]
