"""Every page in headless Chromium against the default model here, on a server and on a
sharded server; what the DOM shows is checked against numbers computed independently through
the Python API (tests/ui/expected.py). Screenshots go to test-artifacts/ui/."""

from __future__ import annotations

import numpy as np
import pytest

from tests.ui import expected
from tests.ui.conftest import ARTIFACTS, LIMIT, logged_in_page, start_backend

POINT, UNIT = "layers.1.mlp.post", 5
TEXT = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n"
TIMEOUT_MS = 180_000


@pytest.fixture(scope="module", params=["local", pytest.param("remote", marks=pytest.mark.slow),
                                        pytest.param("sharded", marks=pytest.mark.slow)])
def backend(request, local_default, tmp_path_factory):
    b = start_backend(request.param, local_default, tmp_path_factory.mktemp(request.param))
    yield b
    b.close()


@pytest.fixture(scope="module")
def page(browser, backend):
    with logged_in_page(browser, backend) as p:
        yield p


def show(page, url: str, shot: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
    assert page.locator("[data-testid=error]").count() == 0, page.inner_text("main")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)


@pytest.fixture(scope="module")
def unit_truth(local_default):
    return expected.unit_expectations(local_default, POINT, UNIT, LIMIT)


@pytest.fixture(scope="module")
def text_truth(local_default):
    return expected.text_expectations(local_default, TEXT)


def test_model_page(page, backend, local_default):
    show(page, backend.web.url(token=True), f"{backend.kind}-model")
    assert page.title().startswith("cloche-default")
    assert page.inner_text("h1") == "cloche-default"
    assert page.inner_text("[data-testid=model-info] [data-key=layers]") == "2"
    assert page.inner_text("[data-testid=model-info] [data-key='world size']") == (
        "2" if backend.kind == "sharded" else "1")
    cells = page.eval_on_selector_all(
        "[data-testid=scores-induction] rect.cell",
        "rs => rs.map(r => [+r.dataset.row, +r.dataset.col, +r.dataset.value])")
    truth = expected.induction_scores(local_default)
    assert len(cells) == truth.size
    for layer, head, value in cells:
        assert value == pytest.approx(truth[layer, head], abs=1e-5)
    links = page.eval_on_selector_all("[data-testid=scores-induction] a",
                                      "as => as.map(a => a.getAttribute('href'))")
    assert "/head?layer=1&head=0" in links
    assert page.locator("[data-testid=points] [data-point='layers.1.mlp.post']").count() == 1


def test_unit_page(page, backend, unit_truth):
    show(page, backend.web.url("unit", token=False, point=POINT, unit=UNIT),
         f"{backend.kind}-unit")
    assert page.inner_text("h1") == f"{POINT} · unit {UNIT}"
    stat = {s["k"]: s["v"] for s in page.eval_on_selector_all(
        "[data-testid=stats] [data-stat]", "ss => ss.map(s => ({k: s.dataset.stat,"
        " v: +s.dataset.value}))")}
    assert stat["count"] == unit_truth["count"]
    assert stat["max"] == pytest.approx(unit_truth["max"], abs=1e-4)
    assert stat["min"] == pytest.approx(unit_truth["min"], abs=1e-4)
    assert stat["mean"] == pytest.approx(unit_truth["mean"], abs=1e-4)
    assert stat["density (>0)"] == pytest.approx(unit_truth["density"], abs=1e-6)
    shown = page.eval_on_selector_all(
        "[data-testid=top-examples] .example", "es => es.map(e => [+e.dataset.exampleId,"
        " +e.dataset.position, +e.dataset.activation])")
    assert [(i, p) for i, p, _ in shown] == [(i, p) for i, p, _ in unit_truth["top"]]
    assert [a for *_, a in shown] == pytest.approx([a for *_, a in unit_truth["top"]], abs=1e-4)
    # the peak token is marked and carries the example's activation
    peak = page.locator("[data-testid=top-examples] .example").first.locator(".tok.peak")
    assert float(peak.get_attribute("data-value")) == pytest.approx(shown[0][2], abs=1e-4)
    counts = page.eval_on_selector_all("[data-testid=histogram] rect.bar",
                                       "bs => bs.map(b => +b.dataset.count)")
    assert sum(counts) == unit_truth["count"]
    promotes = page.eval_on_selector_all("[data-testid=logits-top] td.left",
                                         "ts => ts.map(t => JSON.parse(t.textContent))")
    assert promotes[:5] == unit_truth["promotes"]
    corr = page.locator("[data-testid=correlated] tr[data-unit]").first
    assert int(corr.get_attribute("data-unit")) == unit_truth["corr_unit"]
    assert float(corr.get_attribute("data-r")) == pytest.approx(unit_truth["corr_r"], abs=1e-4)
    assert page.locator("[data-testid=quantiles] .example").count() > 0


def test_unit_page_try_text(page, backend, local_default):
    page.fill("[data-testid=try-text]", "def foo(x):\n    return x")
    page.click("[data-testid=try-run]")
    page.wait_for_selector("[data-testid=try-result][data-done='1']", timeout=TIMEOUT_MS)
    values = page.eval_on_selector_all("[data-testid=try-result] .tok",
                                       "ts => ts.map(t => +t.dataset.value)")
    acts = expected.text_unit_values(local_default, POINT, UNIT, "def foo(x):\n    return x")
    assert values == pytest.approx(acts, abs=1e-4)


def test_text_page(page, backend, text_truth, local_default):
    show(page, backend.web.url("text", token=False, text=TEXT), f"{backend.kind}-text")
    mean = float(page.get_attribute("[data-testid=mean-loss]", "data-value"))
    assert mean == pytest.approx(text_truth["mean_loss"], abs=1e-4)
    losses = page.eval_on_selector_all("[data-testid=loss-tokens] .tok",
                                       "ts => ts.map(t => t.dataset.value)")
    assert len(losses) == len(text_truth["tokens"])
    assert [float(v) for v in losses[1:]] == pytest.approx(list(text_truth["loss"]), abs=1e-4)
    last = local_default.n_layers - 1
    top = page.eval_on_selector_all(f"[data-testid=lens] tr[data-layer='{last}'] td",
                                    "ts => ts.map(t => t.dataset.top)")
    assert top == text_truth["final_top"]
    n_thumbs = page.locator("[data-testid=attention-thumbs] .thumb").count()
    assert n_thumbs == local_default.n_layers * local_default.n_heads
    page.click("[data-testid=attention-thumbs] .thumb[data-layer='1'][data-head='0']")
    assert "head=1.0" in page.url
    cells = page.eval_on_selector_all(
        "[data-testid=attention-big] rect.cell",
        "rs => rs.map(r => [+r.dataset.row, +r.dataset.col, +r.dataset.value])")
    pattern = text_truth["patterns"][1][0]
    assert len(cells) == pattern.size
    got = np.zeros_like(pattern)
    for r, c, v in cells:
        got[r, c] = v
    np.testing.assert_allclose(got, pattern, atol=1e-4)
    page.screenshot(path=str(ARTIFACTS / f"{backend.kind}-text-head.png"), full_page=True)


PROMPT = "def add(a, b):\n    return"


def test_intervene_page(page, backend, local_default):
    show(page, backend.web.url("intervene", token=False, text=PROMPT, point="layers.1.attn.z",
                               head=0, op="zero", max_new_tokens=12),
         f"{backend.kind}-intervene")
    truth = expected.intervene_expectations(local_default, PROMPT, 1, 0, 12)
    for side in ("clean", "edited"):
        rows = page.eval_on_selector_all(f"[data-testid={side}-top] tr[data-token]",
                                         "rs => rs.map(r => [r.dataset.token, +r.dataset.p])")
        assert [t for t, _ in rows[:3]] == truth[f"{side}_top"]
        assert [p for _, p in rows[:3]] == pytest.approx(truth[f"{side}_p"], abs=1e-5)
        assert page.inner_text(f"[data-testid={side}-text]") == truth[f"{side}_text"].strip("\n")
    assert float(page.get_attribute("[data-testid=kl]", "data-value")) > 0


def test_save_contexts_page(page, backend):
    model = backend.model  # the UI's own model: the same session
    name = f"ui-test-{backend.kind}"
    model.run("one two three four", probes={"layers.0.mlp.post": lambda c, x: c.save(
        "acts", x[0])}, save=name)
    acts = model.save_context(name).fetch("acts")[0]
    show(page, backend.web.url("contexts", token=False, name=name, key="acts",
                               index="0, :, 0:8"), f"{backend.kind}-contexts")
    row = page.locator(f"[data-context='{name}'] tr[data-key=acts]")
    assert row.get_attribute("data-entries") == "1"
    assert row.get_attribute("data-shape") == f"[{acts.shape[0]},{acts.shape[1]}]"
    cells = page.eval_on_selector_all("[data-testid=slice-table] tr",
                                      "rs => rs.map(r => [...r.querySelectorAll('td')]"
                                      ".map(td => +td.dataset.value))")
    np.testing.assert_allclose(np.array(cells), acts[:, :8].double().numpy(), atol=1e-6)
    page.click(f"[data-testid='clear-{name}']")
    page.wait_for_selector("body[data-ready='1']", timeout=TIMEOUT_MS)
    page.wait_for_function(f"() => !document.querySelector(\"[data-context='{name}']\")",
                           timeout=TIMEOUT_MS)
    assert name not in model.save_contexts()


def test_head_page(page, backend, local_default):
    show(page, backend.web.url("head", token=False, layer=1, head=0, text=TEXT),
         f"{backend.kind}-head")
    truth = expected.text_expectations(local_default, TEXT)["patterns"][1][0]
    cells = page.eval_on_selector_all(
        "[data-testid=head-pattern] rect.cell",
        "rs => rs.map(r => [+r.dataset.row, +r.dataset.col, +r.dataset.value])")
    got = np.zeros_like(truth)
    for r, c, v in cells:
        got[r, c] = v
    np.testing.assert_allclose(got, truth, atol=1e-4)
    share = float(page.get_attribute("[data-testid=ov]", "data-positive"))
    assert share == pytest.approx(expected.ov_positive_share(local_default, 1, 0), abs=1e-6)
    clean, ablated = expected.repeated_loss(local_default, 1, 0)
    row = page.locator("[data-testid=ablation] tr[data-which=repeated]")
    assert float(row.get_attribute("data-clean")) == pytest.approx(clean, abs=1e-4)
    assert float(row.get_attribute("data-ablated")) == pytest.approx(ablated, abs=1e-4)
    assert ablated > clean + 1  # L1H0 is an induction head: the repeated copy needs it


def test_a_long_page_shows_progress_and_cancels(page, backend):
    """The whole held-out set, cancelled from the page: the computation stops where it runs
    (the UI answers the next page at once) and nothing was cached."""
    page.goto(backend.web.url("unit", token=False, point=POINT, unit=7, limit=1500))
    page.wait_for_selector("[data-testid=progress] progress", timeout=TIMEOUT_MS)
    page.wait_for_function("() => +document.querySelector('[data-testid=progress] progress')"
                           ".value > 0", timeout=TIMEOUT_MS)
    page.click("[data-testid=cancel]")
    page.wait_for_selector("[data-testid=cancelled]", timeout=TIMEOUT_MS)
    assert page.locator("[data-testid=top-examples]").count() == 0
    # the model is free again: a small page renders
    show(page, backend.web.url("unit", token=False, point=POINT, unit=7, limit=4),
         f"{backend.kind}-unit-after-cancel")
    assert page.locator("[data-testid=top-examples] .example").count() > 0
    hit, _ = backend.web.backend.cached(("unit", "cloche-default", "default:heldout", POINT,
                                         "7", 1500))
    assert not hit
