"""The same notebook code against ``cloche.load(...)`` and ``cloche.connect(...)``: same results.

Each scenario is one function of a model; it runs once on a local model and once on a remote
model served by a real ``cloche serve`` subprocess, and the outputs must be *exactly* equal.
"""

from __future__ import annotations

import dataclasses

import cloche
import numpy as np
import pytest
import torch
from cloche.client import connect


@pytest.fixture(scope="module")
def local(server_model_dir):
    return cloche.load(server_model_dir)


@pytest.fixture(scope="module")
def remote(served):
    model = connect(served.address, token=served.token)
    yield model
    model.close()


def assert_identical(a, b, path="out"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{a.shape} {b.dtype}{b.shape}"
        assert torch.equal(a, b), f"{path}: values differ"
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b)
    elif dataclasses.is_dataclass(a):
        assert type(a) is type(b), path
        for f in dataclasses.fields(a):
            assert_identical(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert sorted(a, key=str) == sorted(b, key=str), f"{path}: keys {list(a)} vs {list(b)}"
        for key in a:
            assert_identical(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"[:300]
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
    elif type(a).__module__.startswith("cloche."):  # result objects: compare public attributes
        assert type(a) is type(b), path
        public = [k for k in dir(a) if not k.startswith("_") and not callable(getattr(a, k))]
        for key in public:
            assert_identical(getattr(a, key), getattr(b, key), f"{path}.{key}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def fresh(model, *names):
    for name in names:
        model.save_context(name).clear()


# ------------------------------------------------------------------------------ scenarios


def plain_runs(m):
    ids = m.tokenize(["def add(a, b):", "for i in range(3):"])
    out = m.run(ids)
    return [out, m.run("class Point:"), m.run(torch.tensor([5, 6, 7, 8]))]


def description(m):
    return [m.probe_points(), m.resolve("blocks.1.hook_resid_post"), m.param_names(),
            m.param_names(canonical=False), m.n_layers, m.n_heads, m.d_model, m.d_vocab]


def params(m):
    return [m.param("layers.0.attn.W_Q"), m.param("layers.1.mlp.W_out"), m.param("embed.W_E"),
            m.param("transformer.h.0.ln_1.weight")]


def tokens(m):
    ids = m.tokenize("import os\nprint(os.getcwd())")
    return [ids, m.decode(ids), m.to_str_tokens(ids), m.tokenize(["a b", "while True:"]),
            m.tokenizer("def f(x):\n")["input_ids"], m.tokenizer.decode([5, 6, 7]),
            m.tokenizer.eos_token_id, m.tokenizer.pad_token_id]


def probes_and_save_contexts(m):
    fresh(m, "acts")

    def keep(ctx, x):
        ctx.save("resid", x[:, :3])
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1

    def last(ctx, x):
        ctx.save("post_last", x[:, -1])

    for text in ["def f(x):", "for i in j:", "print(os)"]:
        m.run(text, probes={"layers.0.resid_post": keep, "layers.1.mlp.post": last}, save="acts")
    h = m.save_context("acts")
    return [
        h.keys(), h.num_runs, h.state, h.fetch("resid"), h.fetch("resid", mode="list"),
        h.fetch("post_last", mode="cat"), h["resid"][:, 0, -1].to(torch.float16).fetch(),
        h["post_last"][1:, 0, [1, 3, 5]].fetch(), np.asarray(h["resid"][..., :2]),
        m.save_context("acts").nbytes, "acts" in m.save_contexts(),
    ]


def interventions(m):
    def ablate(ctx, x):
        x = x.clone()
        x[..., :8] = 0
        return x

    def scale(ctx, x):
        return x * 0.5

    return [
        m.run("def add(a, b):", probes={"layers.0.mlp.post": ablate}),
        m.run("def add(a, b):", probes={"layers.1.attn.pattern": [scale, scale]}),
        m.run("def add(a, b):", probes={"blocks.0.hook_resid_pre": scale}),
    ]


def gradients(m):
    fresh(m, "grads")

    def grab(ctx, g):
        ctx.save("g", g)

    first = m.run("def add(a, b): return a", grad_probes={"layers.0.resid_post": grab},
                  backward=True, save="grads")
    w_grad = m.param("layers.0.mlp.W_in", grad=True)

    def objective(out):
        return out.logits[0, -1, 3]

    second = m.run("for i in range", grad_probes={"layers.1.mlp.post": grab},
                   backward=objective, save="grads")
    return [first, second, w_grad, m.save_context("grads").fetch("g", mode="list")]


TEXTS = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n",
    "import os\nimport sys\n", "class Point:\n    pass\n", "while True:\n    break\n",
    "the quick brown fox", "x = 1\ny = 2\n", "print('hello')",
] * 3


def reducers(m):
    fresh(m, "stats")

    def stats(ctx, x):
        ctx.reduce("mean", x, cloche.Mean())
        ctx.reduce("var", x, cloche.Variance())
        ctx.reduce("top", x, cloche.TopK(3))

    kwargs = {} if isinstance(m, cloche.Model) else {"progress": False}
    out = m.run_dataset(TEXTS, probes={"layers.1.mlp.post": stats}, save="stats", batch_size=5,
                        **kwargs)
    h = m.save_context("stats")
    return [out, h.result("mean"), sorted(h.reducers()),
            {k: v.result() for k, v in h.reducers().items()}]


def generation(m):
    return [m.generate("def add(a", 6), m.generate("for i", 5, temperature=1.0, seed=3),
            m.generate(["x", "import os"], 3)]


def code_near_the_data(m):
    fresh(m, "cn")
    m.run("def f(x):", probes={"layers.0.mlp.post": lambda ctx, x: ctx.save("a", x)}, save="cn")

    def stats(model, key, scale=1.0):
        acts = model.save_context("cn").fetch(key)
        return {"mean": acts.mean() * scale, "shape": tuple(acts.shape), "layers": model.n_layers}

    return [m.call(stats, "a", scale=2.0)]


SCENARIOS = [plain_runs, description, params, tokens, probes_and_save_contexts, interventions,
             gradients, reducers, generation, code_near_the_data]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_remote_equals_local(scenario, local, remote):
    assert_identical(scenario(local), scenario(remote))


def test_remote_results_have_local_types(remote):
    out = remote.run("def f():")
    assert type(out) is cloche.RunResult and out.logits.shape[-1] == remote.d_vocab
    assert all(type(p) is cloche.ProbePoint for p in remote.probe_points())
    assert isinstance(remote.save_context("nothing")["x"], cloche.TensorRef)
    assert remote.config.n_layer == remote.n_layers
