"""The common interpretability experiments, one call each, on any cloche model.

Everything here uses only the public model API (``run``, ``run_dataset``, save contexts,
``param``, ``call``, ...), so each experiment runs unchanged on ``cloche.load(...)``, on
``cloche.connect(...)`` and on a sharded server. Heavy work happens next to the data: dataset
statistics and top-k examples are reducers inside ``run_dataset``, weight-based connectivity is
a function shipped with ``model.call``; only results cross the network.

Families (one module each): ``units`` (single units), ``examples`` (dataset examples),
``ablation``, ``patching``, ``attribution`` (attribution patching), ``activations`` (mean /
covariance / PCA / UMAP), ``graph`` (feature attribution graphs), ``connectivity`` (weights
only), ``heads`` (head scores, attention patterns, logit lens) and ``plots`` (matplotlib
helpers). Wherever a ``dataset`` is taken it may
be a ``cloche.data.Dataset``, the name of a server-side dataset or a list of strings.
"""

from cloche.experiments import (
    ablation,
    activations,
    attribution,
    connectivity,
    examples,
    graph,
    heads,
    patching,
    plots,
    units,
)
from cloche.experiments.ablation import AblationResult, ablate, ablation_sweep
from cloche.experiments.activations import PCA, Sample, covariance, mean, pca, project, sample, umap
from cloche.experiments.attribution import AttributionResult, attribution_patching
from cloche.experiments.connectivity import (
    Factored,
    composition_scores,
    connectivity_summary,
    logit_effect,
    ov_circuit,
    qk_circuit,
    top_connections,
    virtual_weights,
)
from cloche.experiments.examples import (
    Example,
    Examples,
    contexts,
    quantile_examples,
    top_activations,
    top_examples,
)
from cloche.experiments.graph import AttributionGraph, EdgeCheck, GraphNode
from cloche.experiments.graph_attribution import attribution_graph
from cloche.experiments.heads import (
    LogitLens,
    attention_patterns,
    detect_heads,
    head_logit_attribution,
    head_scores,
    logit_lens,
    repeated_tokens,
    top_heads,
)
from cloche.experiments.patching import PatchResult, logit_diff, patch, patch_grid
from cloche.experiments.units import TokenValues, UnitStats

__all__ = [
    "PCA",
    "AblationResult",
    "AttributionGraph",
    "AttributionResult",
    "EdgeCheck",
    "Example",
    "Examples",
    "Factored",
    "GraphNode",
    "LogitLens",
    "PatchResult",
    "Sample",
    "TokenValues",
    "UnitStats",
    "ablate",
    "ablation",
    "ablation_sweep",
    "activations",
    "attention_patterns",
    "attribution",
    "attribution_graph",
    "attribution_patching",
    "composition_scores",
    "connectivity",
    "connectivity_summary",
    "contexts",
    "covariance",
    "detect_heads",
    "examples",
    "graph",
    "head_logit_attribution",
    "head_scores",
    "heads",
    "logit_diff",
    "logit_effect",
    "logit_lens",
    "mean",
    "ov_circuit",
    "patch",
    "patch_grid",
    "patching",
    "pca",
    "plots",
    "project",
    "qk_circuit",
    "quantile_examples",
    "repeated_tokens",
    "sample",
    "top_activations",
    "top_connections",
    "top_examples",
    "top_heads",
    "umap",
    "unit_activations",
    "unit_stats",
    "units",
    "virtual_weights",
]

unit_activations = units.activations
unit_stats = units.stats
