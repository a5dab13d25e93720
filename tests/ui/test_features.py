"""Dictionary features in the web UI, and unit pages exported as one HTML file.

A small random dictionary is attached at ``layers.1.resid_post`` of the default model here, on
a server and on a sharded server; its feature page in headless Chromium is checked against
numbers computed independently (the saved feature activations, the dictionary's own ``W_dec``
row times ``W_U``; tests/ui/expected.py). The exported file opens from ``file://`` with no
request beyond it and shows the live page's top examples.
"""

from __future__ import annotations

import pathlib

import pytest
from cloche.errors import UsageError
from cloche.ui import export_unit_page

from tests.ui import expected
from tests.ui.conftest import ARTIFACTS, LIMIT, logged_in_page, start_backend
from tests.ui.test_pages import TIMEOUT_MS, show

NAME, BASE, D_SAE, FEATURE = "res1", "layers.1.resid_post", 64, 7
POINT = f"dict:{NAME}:features"


@pytest.fixture(scope="module")
def weights(local_default):
    return expected.random_dictionary(int(local_default.d_model), D_SAE)


@pytest.fixture(scope="module", params=["local", pytest.param("remote", marks=pytest.mark.slow),
                                        pytest.param("sharded", marks=pytest.mark.slow)])
def backend(request, local_default, weights, tmp_path_factory):
    local_default.attach_dictionary(NAME, weights, point=BASE, architecture="standard")
    b = start_backend(request.param, local_default, tmp_path_factory.mktemp(request.param))
    if b.server is not None:
        b.model.attach_dictionary(NAME, weights, point=BASE, architecture="standard")
    yield b
    b.close()
    local_default.detach_dictionary(NAME)


@pytest.fixture(scope="module")
def page(browser, backend):
    with logged_in_page(browser, backend, downloads=True) as p:
        yield p


@pytest.fixture(scope="module")
def truth(local_default, weights, backend):
    return expected.feature_expectations(local_default, POINT, FEATURE, weights["W_dec"], LIMIT)


def top_examples(page) -> list[list[float]]:
    return page.eval_on_selector_all(
        "[data-testid=top-examples] .example", "es => es.map(e => [+e.dataset.exampleId,"
        " +e.dataset.position, +e.dataset.activation])")


def test_model_page_lists_dictionaries(page, backend):
    show(page, backend.web.url(token=False), f"{backend.kind}-model-dictionaries")
    row = page.locator(f"[data-testid=dictionaries] tr[data-dictionary={NAME}]")
    assert row.get_attribute("data-point") == BASE
    assert row.get_attribute("data-d-sae") == str(D_SAE)
    assert row.get_attribute("data-architecture") == "standard"
    href = row.locator("a").get_attribute("href")
    assert href == f"/unit?point=dict%3A{NAME}%3Afeatures&unit=0"
    row.locator("a").click()
    page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
    assert page.inner_text("h1") == f"{POINT} · feature 0"


def test_feature_page(page, backend, truth):
    show(page, backend.web.url("unit", token=False, point=POINT, unit=FEATURE),
         f"{backend.kind}-feature")
    assert page.inner_text("h1") == f"{POINT} · feature {FEATURE}"
    assert f"d_sae {D_SAE}" in page.inner_text("[data-testid=dictionary]")
    stat = {s["k"]: s["v"] for s in page.eval_on_selector_all(
        "[data-testid=stats] [data-stat]", "ss => ss.map(s => ({k: s.dataset.stat,"
        " v: +s.dataset.value}))")}
    assert stat["count"] == truth["count"]
    assert stat["max"] == pytest.approx(truth["max"], abs=1e-4)
    assert stat["mean"] == pytest.approx(truth["mean"], abs=1e-4)
    assert stat["density (>0)"] == pytest.approx(truth["density"], abs=1e-6)
    shown = top_examples(page)
    assert [(i, p) for i, p, _ in shown] == [(i, p) for i, p, _ in truth["top"]]
    assert [a for *_, a in shown] == pytest.approx([a for *_, a in truth["top"]], abs=1e-4)
    counts = page.eval_on_selector_all("[data-testid=histogram] rect.bar",
                                       "bs => bs.map(b => +b.dataset.count)")
    assert sum(counts) == truth["count"]
    # the direct effect goes through the feature's decoder row, not a neuron's W_out
    assert "W_dec" in page.inner_text("[data-testid=logits-through]")
    promotes = page.eval_on_selector_all("[data-testid=logits-top] td.left",
                                         "ts => ts.map(t => JSON.parse(t.textContent))")
    values = page.eval_on_selector_all("[data-testid=logits-top] td.val",
                                       "ts => ts.map(t => +t.dataset.value)")
    assert promotes[:5] == truth["promotes"]
    assert values[:5] == pytest.approx(truth["promotes_values"], abs=1e-4)
    # correlated units are other features, linked to their feature pages
    corr = page.locator("[data-testid=correlated] tr[data-unit]").first
    assert int(corr.get_attribute("data-unit")) == truth["corr_unit"]
    assert float(corr.get_attribute("data-r")) == pytest.approx(truth["corr_r"], abs=1e-4)
    assert corr.inner_text().startswith(f"feature {truth['corr_unit']}")
    assert f"point=dict%3A{NAME}%3Afeatures" in corr.locator("a").get_attribute("href")


def open_offline(browser, path: pathlib.Path, shot: str) -> list[list[float]]:
    """Open ``path`` from file:// and return its top examples; no request may leave the file."""
    context = browser.new_context(viewport={"width": 1300, "height": 900})
    p = context.new_page()
    requests: list[str] = []
    errors: list[str] = []
    p.on("request", lambda r: requests.append(r.url))
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        p.goto(path.resolve().as_uri())
        p.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        p.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
        assert p.inner_text("h1") == f"{POINT} · feature {FEATURE}"
        assert p.locator("[data-testid=histogram] rect.bar").count() > 0
        assert p.locator("[data-testid=logits-top] td.left").count() > 0
        shown = top_examples(p)
    finally:
        context.close()
    assert errors == []
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    return shown


def test_export_link_gives_the_live_page_offline(page, backend, browser, tmp_path):
    show(page, backend.web.url("unit", token=False, point=POINT, unit=FEATURE),
         f"{backend.kind}-feature")
    live = top_examples(page)
    with page.expect_download() as info:
        page.click("[data-testid=export]")
    path = tmp_path / "exported.html"
    info.value.save_as(path)
    assert "http://" not in path.read_text().replace("http://www.w3.org/2000/svg", "")
    offline = open_offline(browser, path, f"{backend.kind}-feature-exported")
    assert offline == live


def test_export_unit_page_api(browser, backend, truth, tmp_path):
    path = export_unit_page(backend.model, POINT, FEATURE, tmp_path / "feature.html",
                            limit=LIMIT)
    offline = open_offline(browser, path, f"{backend.kind}-feature-export-api")
    assert [(i, p) for i, p, _ in offline] == [(i, p) for i, p, _ in truth["top"]]
    assert [a for *_, a in offline] == pytest.approx([a for *_, a in truth["top"]], abs=1e-4)


def test_export_rejects_bad_units(backend, tmp_path):
    with pytest.raises(UsageError):
        export_unit_page(backend.model, POINT, D_SAE, tmp_path / "x.html", limit=2)
    with pytest.raises(UsageError):
        export_unit_page(backend.model, POINT, -1, tmp_path / "x.html", limit=2)
    with pytest.raises(UsageError):
        export_unit_page(backend.model, POINT, [1.0, 2.0], tmp_path / "x.html", limit=2)
    assert not (tmp_path / "x.html").exists()


def test_direct_effect_of_a_feature_direction(backend, local_default, weights):
    """A direction over features goes through ``direction @ W_dec``."""
    from cloche.ui.views._units import Unit
    from cloche.ui.views.unit import direct_effect

    direction = [0.0] * D_SAE
    direction[3], direction[FEATURE] = 2.0, -1.0
    got = direct_effect(backend.model, POINT, Unit(direction=tuple(direction)), k=5)
    vector = 2.0 * weights["W_dec"][3].double() - weights["W_dec"][FEATURE].double()
    effect = vector @ local_default.param("unembed.W_U").double()
    assert [t for t, _ in got["top"]] == local_default.to_str_tokens(effect.topk(5).indices)
    assert [v for _, v in got["top"]] == pytest.approx(effect.topk(5).values.tolist(),
                                                       abs=1e-5)
