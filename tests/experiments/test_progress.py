"""Every call that can take seconds reports progress one way (``cloche.Progress``): it accepts
``progress=False`` and then draws and sends nothing, and a callback receives ``started`` first,
``progress`` as work completes, and ``done`` last — on a local, a remote and a sharded model."""

from __future__ import annotations

import cloche
import cloche.api.progress as progress_module
import cloche.experiments as ex
import pytest
from cloche.experiments.patching import logit_diff

from tests.dictionaries.checks import make_dictionary

TEXTS = ["the cat sat on the mat", "a dog ran in the park", "one two three four five"] * 2
POINT = "layers.0.mlp.post"


def _pca(m):
    return ex.pca(m, "layers.0.resid_post", TEXTS, n_components=2, progress=False)


#: name -> (call(model, progress), whether it reports counted progress)
def _graph(m, p):
    """The attribution graph needs a dictionary: one attached for the call."""
    m.attach_dictionary("progress-sae", make_dictionary(m.d_model), point="layers.0.resid_post")
    try:
        return ex.attribution_graph(m, "hello there", max_nodes=8, progress=p)
    finally:
        m.detach_dictionary("progress-sae")


CALLS = {
    "run": (lambda m, p: m.run("hello there", progress=p), False),
    "generate": (lambda m, p: m.generate("hello", 2, progress=p), False),
    "run_dataset": (lambda m, p: m.run_dataset(TEXTS, batch_size=2, save="progress-test",
                                                progress=p), True),
    "unit_activations": (lambda m, p: ex.unit_activations(m, POINT, 0, "hello", progress=p),
                         False),
    "unit_stats": (lambda m, p: ex.unit_stats(m, POINT, 0, TEXTS, progress=p), True),
    "top_examples": (lambda m, p: ex.top_examples(m, POINT, 0, TEXTS, k=2, progress=p), True),
    "top_activations": (lambda m, p: ex.top_activations(m, POINT, TEXTS, k=2, progress=p),
                        True),
    "quantile_examples": (lambda m, p: ex.quantile_examples(m, POINT, 0, TEXTS, n_bins=2, k=1,
                                                            progress=p), True),
    "contexts": (lambda m, p: ex.contexts(m, TEXTS, [0, 1], [2, 3], progress=p), False),
    "mean": (lambda m, p: ex.mean(m, POINT, TEXTS, progress=p), True),
    "variance": (lambda m, p: ex.activations.variance(m, POINT, TEXTS, progress=p), True),
    "covariance": (lambda m, p: ex.covariance(m, POINT, TEXTS, progress=p), True),
    "pca": (lambda m, p: ex.pca(m, POINT, TEXTS, n_components=2, progress=p), True),
    "project": (lambda m, p: ex.project(m, _pca(m), "hello", progress=p), False),
    "sample": (lambda m, p: ex.sample(m, POINT, TEXTS, n=5, progress=p), True),
    "loss": (lambda m, p: ex.ablation.loss(m, TEXTS, progress=p), True),
    "ablate": (lambda m, p: ex.ablate(m, "layers.1.attn.head.0", TEXTS, progress=p), True),
    "ablation_sweep": (lambda m, p: ex.ablation_sweep(m, TEXTS, layers=[1], progress=p), True),
    "patch": (lambda m, p: ex.patch(m, "abcd", "abce", "layers.0.resid_pre", logit_diff(5, 6),
                                    progress=p), False),
    "patch_grid": (lambda m, p: ex.patch_grid(m, "abcd", "abce", logit_diff(5, 6),
                                              progress=p), True),
    "attribution_patching": (lambda m, p: ex.attribution_patching(m, "abcd", "abce",
                                                                  logit_diff(5, 6), progress=p),
                             True),
    "attribution_graph": (_graph, True),
    "head_scores": (lambda m, p: ex.head_scores(m, "induction", batch=2, half=4, progress=p),
                    False),
    "detect_heads": (lambda m, p: ex.detect_heads(m, [[5, 6, 7, 5, 6, 7]], "induction",
                                                  progress=p), False),
    "attention_patterns": (lambda m, p: ex.attention_patterns(m, "hello", 0, progress=p),
                           False),
    "logit_lens": (lambda m, p: ex.logit_lens(m, "hello", k=2, progress=p), False),
    "head_logit_attribution": (lambda m, p: ex.head_logit_attribution(
        m, [[5, 6, 7]], 8, progress=p), False),
    "virtual_weights": (lambda m, p: ex.virtual_weights(m, 0, 1, progress=p), False),
    "top_connections": (lambda m, p: ex.top_connections(m, 0, 0, k=2, progress=p), False),
    "ov_circuit": (lambda m, p: ex.ov_circuit(m, 0, 0, progress=p), False),
    "qk_circuit": (lambda m, p: ex.qk_circuit(m, 0, 0, progress=p), False),
    "logit_effect": (lambda m, p: ex.logit_effect(m, (POINT, 0), k=2, progress=p), False),
    "composition_scores": (lambda m, p: ex.composition_scores(m, progress=p), False),
    "connectivity_summary": (lambda m, p: ex.connectivity_summary(m, progress=p), False),
}

KINDS = ["tiny-llama", "remote", "sharded"]


@pytest.fixture(params=KINDS)
def any_model(request, local_models, name):
    m = local_models(request.param)
    yield m
    m.save_context("progress-test").clear()


@pytest.fixture
def bars_at_once(monkeypatch):
    """Bars drawn as soon as a call starts (no delay), so a call that would draw one does."""
    monkeypatch.setattr(progress_module, "DELAY_S", 0.0)


def test_every_experiment_takes_progress():
    """Every public experiment that talks to the model takes progress=, and is tested below."""
    import inspect

    on_a_model = {name for name in ex.__all__ if inspect.isfunction(getattr(ex, name))
                  and next(iter(inspect.signature(getattr(ex, name)).parameters)) == "model"}
    takes = {name for name in on_a_model
             if "progress" in inspect.signature(getattr(ex, name)).parameters}
    assert on_a_model - takes == {"repeated_tokens"}  # makes token ids, asks the model nothing
    assert takes - set(CALLS) == {"umap"}  # umap needs umap-learn; it wraps sample


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CALLS))
def test_progress_false_draws_and_sends_nothing(any_model, name, bars_at_once, capfd):
    call, _ = CALLS[name]
    call(any_model, False)
    assert capfd.readouterr().err == ""


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_callback_sees_started_progress_done(any_model, name, capfd):
    call, counted = CALLS[name]
    events: list[dict] = []
    call(any_model, events.append)
    kinds = [e["type"] for e in events]
    assert kinds.count("started") == 1
    assert "progress" not in kinds[:kinds.index("started")]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and events[-1]["ok"] is True
    assert set(kinds) <= {"started", "queued", "progress", "done"}
    if counted:
        steps = [e for e in events if e["type"] == "progress"]
        assert steps and steps[-1]["done"] == steps[-1]["total"]
        assert [e["done"] for e in steps] == sorted(e["done"] for e in steps)
    assert capfd.readouterr().err == ""  # a callback instead of a bar


def test_the_default_draws_a_bar_when_slow(local_models, bars_at_once, capfd):
    """The counterpart of the quiet tests: the default draws (when past the delay)."""
    m = local_models("tiny-llama")
    ex.head_scores(m, "induction", batch=2, half=4)
    assert "head_scores" in capfd.readouterr().err
    ex.ablation_sweep(m, TEXTS, layers=[1])
    err = capfd.readouterr().err
    assert "ablation_sweep" in err and f"{m.n_heads}/{m.n_heads}" in err


def test_a_quick_call_draws_nothing(local_models, capfd, monkeypatch):
    """A loop of quick calls stays silent: no bar before the delay."""
    monkeypatch.setattr(progress_module, "DELAY_S", 3600.0)
    m = local_models("tiny-llama")
    for _ in range(3):
        m.run("hello")
    ex.head_scores(m, "induction", batch=2, half=4)
    assert capfd.readouterr().err == ""


def test_runs_inside_an_experiment_report_to_its_bar(local_models, bars_at_once, capfd):
    """Bars do not nest: the runs of an experiment draw none of their own."""
    m = local_models("tiny-llama")
    ex.patch_grid(m, "abcd", "abce", logit_diff(5, 6))
    err = capfd.readouterr().err
    assert "patch_grid" in err and "run:" not in err and "run_dataset" not in err


def test_progress_rejects_what_it_cannot_use(local_models):
    m = local_models("tiny-llama")
    with pytest.raises(cloche.UsageError, match="progress"):
        m.run("hello", progress="yes")
    with pytest.raises(cloche.UsageError, match="progress"):
        ex.head_scores(m, "induction", batch=2, half=4, progress=3)
