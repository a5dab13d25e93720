"""Learned things next to the model: linear probes, steering vectors and DAS rotations, each
trained in the process that runs its point and usable afterwards as a probe function.

Like dictionary training (:mod:`cloche.dictionaries.training`), these drive the model only
through its public methods (``run``, ``run_dataset``, ``call``), which they receive, and keep
what they train between runs in the process that owns the point (:mod:`cloche.learned.live`).
"""

from cloche.learned.das import DasRotation, interchange_accuracy, train_das
from cloche.learned.linear_probe import LinearProbe, train_linear_probe
from cloche.learned.steering import SteeringVector, target_logprob, train_steering_vector

__all__ = ["DasRotation", "LinearProbe", "SteeringVector", "interchange_accuracy",
           "target_logprob", "train_das", "train_linear_probe", "train_steering_vector"]
