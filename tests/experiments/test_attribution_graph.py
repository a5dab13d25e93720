"""Attribution graphs through dictionaries on the shipped default model (and on a server, and
on a sharded model): edges against explicit interventions on the frozen model, completeness,
pruning fractions, JSON.

The frozen model is linear by construction, so an edge must equal the change of its target
when its source alone is scaled in a forward pass of the frozen model (the other inputs held),
and every target must equal the sum of its row plus its value with every input at zero.
"""

from __future__ import annotations

import cloche
import numpy as np
import pytest
import torch
from cloche.errors import UsageError
from cloche.experiments import AttributionGraph, attribution_graph

from tests.dictionaries.checks import make_dictionary
from tests.experiments.conftest import default_dir
from tests.experiments.graph_dictionaries import pca_dictionary, random_transcoder

PROMPT = "Once upon a time, there was a"
NAMES = ("p0", "p1")
TOLERANCE = 1e-4  # relative: edge against intervention


def _scratch(model) -> list[str]:
    return [n for n in model.save_contexts() if n.startswith("exp/")]


def _attach(model, dictionaries) -> None:
    for name, sae in dictionaries.items():
        model.attach_dictionary(name, sae)


def _detach(model, dictionaries) -> None:
    for name in dictionaries:
        model.detach_dictionary(name)


@pytest.fixture(scope="module")
def attached(local_models):
    model = local_models("default")
    dictionaries = {name: pca_dictionary(model, f"layers.{i}.resid_post")
                    for i, name in enumerate(NAMES)}
    _attach(model, dictionaries)
    try:
        yield model, dictionaries
    finally:
        _detach(model, dictionaries)


@pytest.fixture(scope="module")
def graph(attached):
    model, _ = attached
    g = attribution_graph(model, PROMPT, batch_size=64, progress=False)
    assert _scratch(model) == []
    return g


def _first(edges, source_kind: str, target_kind: str):
    return next((e for e in edges if e[0].startswith(source_kind + ":")
                 and e[1].startswith(target_kind + ":")), None)


def test_the_graph_covers_every_active_feature(attached, graph):
    model, _ = attached
    counts = {k: sum(n.kind == k for n in graph) for k in ("feature", "error", "token", "logit")}
    seq = len(model.tokenize(PROMPT))
    assert counts == {"feature": 2 * 16 * seq, "error": 2 * seq, "token": seq, "logit": 1}
    assert graph.info["computed_features"] == counts["feature"]
    assert graph.target["token_id"] == int(model.run(PROMPT).logits[0, -1].argmax())
    assert graph.dictionaries["p0"]["point"] == "layers.0.resid_post"
    # features of the first dictionary have no feature sources; the second's only the first's
    first = [graph.index(n) for n in graph if n.dictionary == "p0" and n.kind == "feature"]
    second = [graph.index(n) for n in graph if n.dictionary == "p1" and n.kind == "feature"]
    assert not graph.adjacency[np.ix_(first, first + second)].any()
    assert graph.adjacency[np.ix_(second, first)].any()
    assert not graph.adjacency[np.ix_(second, second)].any()


def test_kept_edges_equal_interventions_on_the_frozen_model(attached, graph):
    model, _ = attached
    kept = graph.prune(0.8).edges()
    checked = []
    for kinds in (("feature", "feature"), ("token", "feature"), ("error", "feature"),
                  ("feature", "logit"), ("error", "logit")):
        edge = _first(kept, *kinds) or _first(graph.edges(), *kinds)
        assert edge is not None, kinds
        check = graph.verify_edge(model, edge[0], edge[1])
        assert check.predicted == -edge[2]  # removing the source (factor -1)
        assert check.error <= TOLERANCE, check
        checked.append(check)
    assert _first(kept, "feature", "feature") is not None  # a feature-to-feature edge was kept
    half = graph.verify_edge(model, checked[0].source, checked[0].target, factor=0.5)
    assert half.error <= TOLERANCE, half  # linear: any scaling of the source
    assert _scratch(model) == []


def test_every_target_is_its_row_plus_its_bias(graph):
    residuals = graph.completeness()
    assert len(residuals) == graph.info["computed_features"] + 1
    for node_id, residual in residuals.items():
        i = graph.index(node_id)
        node = graph.nodes[i]
        scale = float(np.abs(graph.adjacency[i]).sum()) + abs(node.bias) + abs(node.value)
        assert abs(residual) <= 1e-5 * scale, (node_id, residual, scale)
    logit = graph.logit
    # the frozen model reproduces the model's logit on the prompt ...
    assert logit.value == pytest.approx(graph.target["logit"], rel=1e-5, abs=1e-5)
    # ... and the input nodes' effects plus the constant (decoder biases) add up to it
    assert float(graph.adjacency[-1].sum()) + logit.bias == pytest.approx(logit.value,
                                                                          rel=1e-5, abs=1e-5)
    for node in graph.features():  # a topk feature that fires passes its pre-activation on
        assert node.pre_activation == pytest.approx(node.activation, rel=1e-4, abs=1e-4)


def test_influence_is_the_series_of_the_normalised_graph(graph):
    a = np.abs(graph.adjacency)
    n = a / np.maximum(a.sum(axis=1, keepdims=True), 1e-10)
    weights = np.zeros(len(graph))
    weights[-1] = 1.0
    closed_form = weights @ (np.linalg.inv(np.eye(len(graph)) - n) - np.eye(len(graph)))
    np.testing.assert_allclose(graph.influence(), closed_form, atol=1e-9)


@pytest.mark.parametrize("keep", [0.5, 0.8, 0.95])
def test_pruning_keeps_the_requested_fraction(graph, keep):
    influence = graph.influence()
    total = influence.sum()
    pruned = graph.prune(keep)
    info = pruned.pruning
    assert info["keep"] == keep and info["edge_keep"] == graph.edge_keep
    # the nodes chosen carry at least `keep` of the influence, and are the fewest that do
    ordered = np.sort(influence)[::-1]
    cumulative = np.cumsum(ordered) / total
    fewest = int(np.searchsorted(cumulative, keep)) + 1
    assert info["node_fraction"] >= keep
    assert info["node_fraction"] == pytest.approx(cumulative[fewest - 1])
    assert fewest == 1 or cumulative[fewest - 2] < keep
    assert info["edge_fraction"] >= graph.edge_keep
    threshold = ordered[fewest - 1]
    kept = {n.id for n in pruned}
    for node in pruned:
        assert node.influence == pytest.approx(influence[graph.index(node.id)])
        if node.kind in ("feature", "error"):
            assert node.influence >= threshold
    assert info["retained_fraction"] == pytest.approx(
        sum(influence[graph.index(i)] for i in kept) / total)
    assert len(pruned) < len(graph) and pruned.n_edges < graph.n_edges
    for source, target, weight in pruned.edges():  # edges keep their weights
        assert weight == graph.weight(source, target)
    for node in pruned.features():  # every kept feature is on a path to the logit
        i = pruned.index(node.id)
        assert pruned.adjacency[i].any() and pruned.adjacency[:, i].any()
    assert pruned.adjacency[-1].any()
    assert all(f"token:{p}" in kept for p in range(len(graph.tokens)))


def test_json_round_trips(graph):
    for g in (graph, graph.prune()):
        text = g.to_json()
        back = AttributionGraph.from_json(text)
        assert back.to_json() == text
        assert back.nodes == g.nodes
        assert np.array_equal(back.adjacency, g.adjacency)
        assert back.target == g.target and back.pruning == g.pruning
    with pytest.raises(UsageError, match="JSON"):
        AttributionGraph.from_json("{not json")
    with pytest.raises(UsageError, match="cloche-attribution-graph"):
        AttributionGraph.from_json('{"format": "something else"}')


def test_a_server_gives_the_same_graph(attached, graph):
    from cloche.client import connect
    from cloche.server.app import Server
    from cloche.server.config import ServerConfig

    _, dictionaries = attached
    server = Server(cloche.load(default_dir()), ServerConfig(token="graph-test-token-2026", port=0))
    host, port = server.start()
    try:
        with connect(f"{host}:{port}", token="graph-test-token-2026") as remote:
            _attach(remote, dictionaries)
            got = attribution_graph(remote, PROMPT, batch_size=64, progress=False)
            edge = _first(graph.prune().edges(), "feature", "feature")
            check = got.verify_edge(remote, edge[0], edge[1])
            assert _scratch(remote) == []
    finally:
        server.shutdown()
    assert [n.id for n in got] == [n.id for n in graph]
    np.testing.assert_allclose(got.adjacency, graph.adjacency, rtol=1e-5, atol=1e-6)
    assert got.target["token_id"] == graph.target["token_id"]
    assert check.error <= TOLERANCE


def test_transcoders_with_a_node_budget(attached):
    """circuit-tracer's own setting: transcoders in place of the MLPs; with more active
    features than ``max_nodes``, the logit's row first, then features by influence."""
    model, _ = attached
    transcoders = {f"t{i}": random_transcoder(int(model.d_model), i, seed=i) for i in (0, 1)}
    _attach(model, transcoders)
    try:
        g = attribution_graph(model, PROMPT, dictionaries=list(transcoders), max_nodes=48,
                              batch_size=24, progress=False)
        assert g.dictionaries["t0"]["out_point"] == "layers.0.mlp.out"
        computed = [n for n in g.features() if n.value is not None]
        assert len(computed) == g.info["computed_features"] == 48 < len(g.features())
        on_logit = max(g.features(), key=lambda n: abs(g.weight(n.id, g.logit.id)))
        assert on_logit.value is not None  # the strongest direct effect is computed first
        for node_id, residual in g.completeness().items():
            i = g.index(node_id)
            scale = float(np.abs(g.adjacency[i]).sum()) + abs(g.nodes[i].value or 0)
            assert abs(residual) <= 1e-5 * scale + 1e-6
        source, target, weight = _first(g.edges(), "feature", "feature")
        assert source.startswith("feature:t0") and target.startswith("feature:t1")
        check = g.verify_edge(model, source, target, factor=1.0 / abs(weight))
        assert check.error <= TOLERANCE, check
        pruned = g.prune()
        assert all(n.value is not None for n in pruned.features())  # sources-only are dropped
    finally:
        _detach(model, transcoders)
    assert _scratch(model) == []


def test_layer_norms_biases_and_an_ungated_mlp(local_models):
    """The tiny GPT-2: centred LayerNorms, position embeddings and biases (the targets'
    constants) and a GELU MLP, frozen as act(pre)/pre."""
    model = local_models("tiny-gpt2")
    dictionaries = {f"b{i}": make_dictionary(int(model.d_model), seed=i, hook_name=point)
                    for i, point in enumerate(("layers.0.resid_post", "layers.1.resid_post"))}
    _attach(model, dictionaries)
    try:
        g = attribution_graph(model, torch.arange(3, 15), progress=False)
        assert g.info["frozen"] == {"patterns": 2, "scales": 5, "mlps": 2}
        # the position embeddings are constants of the linear model, not input nodes
        assert any(abs(n.bias) > 1e-3 for n in g.features() if n.dictionary == "b0")
        assert g.logit.value == pytest.approx(g.target["logit"], rel=1e-5, abs=1e-5)
        for node_id, residual in g.completeness().items():
            i = g.index(node_id)
            scale = float(np.abs(g.adjacency[i]).sum()) + abs(g.nodes[i].bias) \
                + abs(g.nodes[i].value)
            assert abs(residual) <= 1e-5 * scale, node_id
        source, target, weight = _first(g.edges(), "feature", "feature")
        check = g.verify_edge(model, source, target, factor=1.0 / abs(weight))
        assert check.error <= TOLERANCE, check
    finally:
        _detach(model, dictionaries)
    assert _scratch(model) == []


@pytest.mark.slow
def test_a_sharded_model_gives_the_same_graph(local_models):
    """The tiny Llama over two ranks (one layer each), a dictionary on each rank."""
    local, sharded = local_models("tiny-llama"), local_models("sharded")
    dictionaries = {f"s{i}": make_dictionary(int(local.d_model), seed=i, hook_name=point)
                    for i, point in enumerate(("layers.0.resid_post", "layers.1.resid_post"))}
    _attach(local, dictionaries)
    _attach(sharded, dictionaries)
    try:
        assert [sharded.owner_of(f"dict:{n}:features") for n in dictionaries] == [0, 1]
        ids = torch.arange(5, 17)
        want = attribution_graph(local, ids, progress=False)
        got = attribution_graph(sharded, ids, progress=False)
        assert [n.id for n in got] == [n.id for n in want]
        np.testing.assert_allclose(got.adjacency, want.adjacency, rtol=1e-5, atol=1e-6)
        source, target, weight = _first(got.edges(), "feature", "feature")
        check = got.verify_edge(sharded, source, target, factor=1.0 / abs(weight))
        assert check.error <= TOLERANCE, check
        assert max(abs(r) for r in got.completeness().values()) < 1e-4
    finally:
        _detach(local, dictionaries)
        _detach(sharded, dictionaries)
    assert _scratch(sharded) == []


def test_bad_requests_are_clear_errors(attached, graph, local_models):
    model, _ = attached
    with pytest.raises(UsageError, match="not one"):
        attribution_graph(model, PROMPT, target=" once upon", progress=False)
    with pytest.raises(UsageError, match="no dictionary named"):
        attribution_graph(model, PROMPT, dictionaries=["nope"], progress=False)
    with pytest.raises(UsageError, match="batch_size"):
        attribution_graph(model, PROMPT, batch_size=0, progress=False)
    with pytest.raises(UsageError, match="keep must be a fraction"):
        attribution_graph(model, PROMPT, keep=2, progress=False)
    with pytest.raises(UsageError, match="needs dictionaries"):
        attribution_graph(local_models("tiny-gpt2"), [3, 4, 5], progress=False)
    with pytest.raises(UsageError, match="no node"):
        graph.node("feature:p0:0:99999")
    with pytest.raises(UsageError, match="an edge goes"):
        graph.verify_edge(model, graph.logit.id, graph.logit.id)
    with pytest.raises(UsageError, match="keep"):
        graph.prune(1.5)
    assert _scratch(model) == []


@pytest.mark.parametrize("architecture", ["jumprelu_skip_transcoder", "rescaled-topk"])
def test_dictionaries_it_cannot_linearise_are_refused(local_models, architecture):
    from cloche.dictionaries import DictionaryConfig, SparseDictionary

    model = local_models("tiny-gpt2")
    d = model.d_model
    if architecture == "rescaled-topk":
        config = DictionaryConfig(d_in=d, d_sae=2 * d, architecture="topk", k=2,
                                  rescale_acts_by_decoder_norm=True,
                                  hook_name="layers.1.resid_post")
        match = "rescale_acts_by_decoder_norm"
    else:
        config = DictionaryConfig(d_in=d, d_sae=2 * d, d_out=d, architecture=architecture,
                                  hook_name="layers.1.ln2", hook_name_out="layers.1.mlp.out",
                                  apply_b_dec_to_input=False)
        match = "skip transcoder"
    model.attach_dictionary("odd", SparseDictionary(config))
    try:
        with pytest.raises(UsageError, match=match):
            attribution_graph(model, [3, 4, 5], progress=False)
    finally:
        model.detach_dictionary("odd")
