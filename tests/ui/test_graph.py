"""The Graph page in headless Chromium: the pruned attribution graph of a prompt through two
dictionaries attached to the default model (here, and on a server), checked against the graph
computed through the Python API on the same model; a feature links to its unit page; the JSON
download reads back as the same graph."""

from __future__ import annotations

import numpy as np
import pytest
from cloche.experiments import AttributionGraph, attribution_graph

from tests.experiments.graph_dictionaries import pca_dictionary
from tests.ui.conftest import logged_in_page, start_backend
from tests.ui.test_pages import TIMEOUT_MS, show

PROMPT = "Once upon a time, there was a"
NAMES = ("g0", "g1")


@pytest.fixture(scope="module", params=["local", pytest.param("remote", marks=pytest.mark.slow)])
def backend(request, local_default, tmp_path_factory):
    b = start_backend(request.param, local_default, tmp_path_factory.mktemp(request.param))
    for i, name in enumerate(NAMES):
        b.model.attach_dictionary(name, pca_dictionary(b.model, f"layers.{i}.resid_post"))
    yield b
    for name in NAMES:
        b.model.detach_dictionary(name)
    b.close()


@pytest.fixture(scope="module")
def truth(backend):
    """The graph through the Python API, computed where the page's is (no cross-process
    comparison)."""
    return attribution_graph(backend.model, PROMPT, max_nodes=200, progress=False).prune()


@pytest.fixture(scope="module")
def page(browser, backend):
    with logged_in_page(browser, backend, width=1400, downloads=True) as p:
        yield p


def test_graph_page_draws_the_pruned_graph(page, backend, truth, tmp_path):
    show(page, backend.web.url("graph", token=False, prompt=PROMPT), f"{backend.kind}-graph")
    nodes = page.eval_on_selector_all("[data-testid=graph] .node",
                                      "ns => ns.map(n => [n.dataset.id, n.dataset.kind])")
    assert sorted(map(tuple, nodes)) == sorted((n.id, n.kind) for n in truth)
    assert any(kind == "feature" for _, kind in nodes)
    edges = page.eval_on_selector_all(
        "[data-testid=graph] line.edge", "es => es.map(e => [e.dataset.source, e.dataset.target,"
        " +e.dataset.weight, e.getAttribute('stroke'), +e.getAttribute('stroke-width')])")
    assert len(edges) == truth.n_edges
    for source, target, weight, colour, _ in edges:
        assert weight == pytest.approx(truth.weight(source, target), rel=1e-9)
        assert colour == ("rgb(234,88,12)" if weight >= 0 else "rgb(37,99,235)")
    by_size = sorted(edges, key=lambda e: abs(e[2]))
    widths = [e[4] for e in by_size]
    assert widths == sorted(widths) and widths[-1] > widths[0]  # width grows with |weight|
    kept = page.get_attribute("[data-testid=graph-stats] [data-key=kept]", "data-value")
    assert float(kept) == pytest.approx(truth.pruning["node_fraction"])
    # the JSON download is the graph
    with page.expect_download() as info:
        page.click("[data-testid=graph-json]")
    path = tmp_path / "graph.json"
    info.value.save_as(path)
    downloaded = AttributionGraph.from_json(path.read_text())
    assert [n.id for n in downloaded] == [n.id for n in truth]
    np.testing.assert_allclose(downloaded.adjacency, truth.adjacency, rtol=1e-9)
    # a feature node opens its unit page
    feature = truth.features()[0]
    page.click(f"[data-testid=graph] [data-id='{feature.id}']")
    page.wait_for_url("**/unit?**", timeout=TIMEOUT_MS)
    page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
    assert page.inner_text("h1") == (f"dict:{feature.dictionary}:features · feature"
                                     f" {feature.feature}")
