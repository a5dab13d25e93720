"""``cloche check``: the parity battery on a user's own checkpoint.

Before trusting an experiment, a researcher checks that nothing is silently wrong on their
model: every canonical probe point against transformers' own (eager) reference, a run without
probes bit-equal to plain transformers, ablations against the equivalent weight edits, gradient
probes against autograd, TransformerLens aliases, and a sharded model against one process.
:func:`check` returns a :class:`Report` (a table, JSON, ``ok``); :func:`battery` runs the
single-process checks on a model already loaded.
"""

from cloche.check.battery import battery, canonical_points, known_pattern_divergence
from cloche.check.compare import capture, compare, tolerance
from cloche.check.report import FAIL, PASS, SKIP, Report, Row
from cloche.check.runner import check, token_inputs
from cloche.check.sharded import sharded_rows

__all__ = ["FAIL", "PASS", "SKIP", "Report", "Row", "battery", "canonical_points", "capture",
           "check", "compare", "known_pattern_divergence", "sharded_rows", "token_inputs",
           "tolerance"]
