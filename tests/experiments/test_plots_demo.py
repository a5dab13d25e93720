"""The plot helpers draw real results; ``cloche demo`` runs end to end against a real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cloche import experiments as ex

from tests.experiments.helpers import random_dataset

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the Agg backend


@pytest.fixture
def llama(local_models):
    return local_models("tiny-llama")


def test_plots_draw_experiment_results(llama, tmp_path):
    view = ex.units.activations(llama, "layers.1.mlp.post", 3, "def f(x):\n    return x\n")
    att = ex.attention_patterns(llama, "abcabc", 1, heads=0)
    axes = [
        ex.plots.token_heatmap(view.tokens[0], view.values[0, :, 0], title="neuron 3"),
        ex.plots.head_scores(ex.head_scores(llama, "induction", batch=2, half=6)),
        ex.plots.attention_pattern(att["pattern"][0], att["tokens"]),
        ex.plots.patching_grid(ex.patch_grid(llama, "abcd", "abce", ex.logit_diff(5, 6),
                                             progress=False)),
        ex.plots.activation_histogram(ex.units.stats(llama, "layers.1.mlp.post", 3,
                                                     ["some text", "more text here"], bins=8)),
        ex.plots.connectivity_graph(ex.connectivity_summary(llama)),
    ]
    ds = random_dataset(llama, n=6)
    result = ex.pca(llama, "layers.0.resid_post", ds, n_components=2)
    drawn = ex.sample(llama, "layers.0.resid_post", ds, n=30)
    axes.append(ex.plots.pca_scatter(result.transform(drawn.activations), colors=drawn.positions))
    for i, ax in enumerate(axes):
        assert ax.has_data() or ax.texts  # something was drawn on every one
        path = tmp_path / f"{i}.png"
        ax.figure.savefig(path)
        assert path.stat().st_size > 1000
        plt.close(ax.figure)
    with pytest.raises(ValueError, match="tokens but"):
        ex.plots.token_heatmap(["a", "b"], np.zeros(3))


def test_demo_runs_against_a_server_it_starts(tmp_path, capsys):
    from cloche.experiments import demo

    from tests.experiments.conftest import save_tiny_llama

    model_dir = save_tiny_llama(tmp_path / "model")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    pass\n" * 20)
    out = tmp_path / "plots"
    torch.manual_seed(0)
    code = demo.main(["--model", str(model_dir), "--dataset", str(corpus), "--limit", "6",
                      "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "-> induction head: layers." in printed
    assert "without head" in printed and "\u00ab" in printed  # ablation and a marked example
    assert f"plots -> {out.resolve()}" in printed  # the folder it writes to, named
    names = {p.name for p in out.iterdir()}
    assert {"head_scores_induction.png", "induction_attention.png", "neuron_histogram.png",
            "resid_pca.png", "connectivity.png"} <= names


def test_results_show_themselves_in_a_notebook(default_model):
    scores = ex.head_scores(default_model, "induction", batch=2, half=8)
    assert isinstance(scores, np.ndarray) and scores.kind == "induction"
    page = scores._repr_html_()
    assert "induction head scores" in page and page.count("<tr>") == default_model.n_layers + 1
    assert f"{float(scores.max()):.2f}" in page
    detected = ex.detect_heads(default_model, ex.repeated_tokens(default_model, batch=2, half=8),
                               "induction")
    assert "induction detection head scores" in detected._repr_html_()
    examples = ex.top_examples(default_model, "layers.1.mlp.post", 3, "default:heldout", k=2,
                               limit=8, progress=False)
    page = examples._repr_html_()
    assert examples.describe() in page.replace("&#x27;", "'") and "<b" in page
    assert "<script" not in page  # tokens are escaped


def test_the_demo_picks_a_neuron_whose_promoted_tokens_read_as_words(default_model):
    from cloche.experiments import demo

    assert demo._readable(" return") and demo._readable("Point")
    assert not demo._readable("\ufffd") and not demo._readable(" (") and not demo._readable("a")
    point = f"layers.{default_model.n_layers - 1}.mlp.post"
    score = np.random.default_rng(0).random(default_model.d_mlp)
    unit = demo._readable_neuron(default_model, point, score)
    promoted = [t for t, _ in ex.logit_effect(default_model, (point, unit), k=5)["top"]]
    assert sum(demo._readable(t) for t in promoted) >= 4, promoted
