"""Every adapter family against plain Hugging Face: logits, probe points, ablations, gradients."""

from __future__ import annotations

import cloche
import pytest
import torch
import transformers
from cloche.check import capture, known_pattern_divergence
from tests.tiny_models import CAUSAL, FAMILIES, MOE, VOCAB

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def plain(directory, **kwargs):
    model = cloche.load(directory).hf_model  # same loading path, then plain HF calls only
    if kwargs:
        cls = type(model)
        model = cls.from_pretrained(directory, **kwargs)
    return model.eval()


def reference(directory, **kwargs):
    hf = plain(directory, **kwargs)
    with torch.no_grad():
        return hf(IDS, output_hidden_states=True, output_attentions="attn_implementation" in kwargs)


def capture_all(model, names):
    return capture(model, IDS, names, context=f"capture-{id(names)}")


@pytest.mark.parametrize("family", FAMILIES)
def test_no_probe_run_is_exactly_plain_hf(family, tiny_dir, tiny_model):
    model = tiny_model(family)
    ref = reference(tiny_dir(family))
    result = model.run(IDS)
    assert torch.equal(result.logits, ref.logits)
    if model.causal:
        logits = ref.logits[:, :-1].reshape(-1, VOCAB)
        expected = torch.nn.functional.cross_entropy(logits, IDS[:, 1:].reshape(-1))
        assert result.loss == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_canonical_points_match_hf_references(family, tiny_dir, tiny_model):
    model = tiny_model(family)
    n = model.n_layers
    names = [p.name for p in model.probe_points() if not p.name.startswith("module:")]
    sparse = [i for i in range(n) if f"layers.{i}.mlp.router" in names]
    assert bool(sparse) == (family in MOE)
    internals = ("attn.q", "attn.k", "attn.v", "attn.pattern", "attn.z")
    if model.executor.adapter.attention is None:  # attention computed inline: Falcon, BLOOM
        internals = ()
        assert "layers.0.attn.pattern" not in names
        with pytest.raises(cloche.UnknownProbePoint, match="computes attention inline"):
            model.resolve("layers.0.attn.pattern")
    for required in ("embed", "logits", *(f"layers.{i}.{s}" for i in range(n) for s in (
            "resid_pre", *internals, "attn.out",
            *(("mlp.router", "mlp.experts.0.post") if i in sparse else ("mlp.pre", "mlp.post")),
            "mlp.out", "resid_post"))):
        assert required in names, required
    got = capture_all(model, names)
    ref = reference(tiny_dir(family))
    eager = reference(tiny_dir(family), attn_implementation="eager")
    for i in range(n):
        torch.testing.assert_close(got[f"layers.{i}.resid_pre"], ref.hidden_states[i], atol=1e-5, rtol=0)
        # (Falcon's eager ALiBi branch adds ALiBi twice: see test_falcon_alibi_pattern)
        if internals and not known_pattern_divergence(model.config):
            torch.testing.assert_close(got[f"layers.{i}.attn.pattern"], eager.attentions[i],
                                       atol=1e-5, rtol=0)
        if i < n - 1:
            torch.testing.assert_close(got[f"layers.{i}.resid_post"], ref.hidden_states[i + 1],
                                       atol=1e-5, rtol=0)
    last = got["final_norm"] if "final_norm" in got else got[f"layers.{n - 1}.resid_post"]
    torch.testing.assert_close(last, ref.hidden_states[n], atol=1e-5, rtol=0)
    torch.testing.assert_close(got["logits"], ref.logits, atol=1e-5, rtol=0)
    # the decomposition the names promise: resid_post = resid_mid + mlp.out (sequential blocks)
    if "layers.0.resid_mid" in got and model.causal:
        for i in range(n):
            torch.testing.assert_close(got[f"layers.{i}.resid_mid"],
                                       got[f"layers.{i}.resid_pre"] + got[f"layers.{i}.attn.out"],
                                       atol=1e-5, rtol=0)
            torch.testing.assert_close(got[f"layers.{i}.resid_post"],
                                       got[f"layers.{i}.resid_mid"] + got[f"layers.{i}.mlp.out"],
                                       atol=1e-5, rtol=0)
    if not internals:
        return
    # z through W_O gives attn.out (or the input of the norm that makes attn.out: Gemma 2, 3)
    W_O = model.param("layers.0.attn.W_O")
    out = torch.einsum("bshd,hdm->bsm", got["layers.0.attn.z"], W_O)
    try:
        b_O = model.param("layers.0.attn.b_O")
    except cloche.UnknownProbePoint:
        b_O = 0
    site = model.executor.adapter.block_sites["attn.out"]
    if "norm" in site.module:
        path = f"module:{model.executor.adapter.layers}.0.{site.module}:input"
        torch.testing.assert_close(out + b_O, capture_all(model, [path])[path], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out + b_O, got["layers.0.attn.out"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_zeroing_a_neuron_equals_zeroing_its_output_weights(family, tiny_dir, tiny_model):
    """Zeroing neuron j at mlp.post (an expert's post in a sparse block) equals zeroing row j
    of the canonical W_out (that expert's W_out) on a fresh copy of the model."""
    model = tiny_model(family)
    j, layer = 5, model.n_layers - 1
    mlp = f"layers.{layer}.mlp.experts.2" if family in MOE else f"layers.{layer}.mlp"

    def zero(ctx, x):
        x = x.clone()
        x[..., j] = 0
        return x

    ablated = model.run(IDS, probes={f"{mlp}.post": zero}).logits
    edited = cloche.load(tiny_dir(family))
    with torch.no_grad():
        edited.param(f"{mlp}.W_out")[j] = 0
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("point", ["attn.result", "attn.z"])
def test_zeroing_a_head_equals_zeroing_its_w_o_slice(family, point, tiny_dir, tiny_model):
    """Zeroing head h's result (or its z) at a probe point equals zeroing W_O[h] (the canonical
    (heads, d_head, d_model) view of the output projection) on a fresh copy of the model."""
    model = tiny_model(family)
    h, layer = 1, model.n_layers - 1
    name = f"layers.{layer}.{point}"
    assert name in {p.name for p in model.probe_points()}

    def zero(ctx, x):
        x = x.clone()
        x[:, :, h] = 0
        return x

    ablated = model.run(IDS, probes={name: zero}).logits
    edited = cloche.load(tiny_dir(family))
    with torch.no_grad():
        edited.param(f"layers.{layer}.attn.W_O")[h] = 0
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)


@pytest.mark.parametrize("family", CAUSAL)
def test_gradient_probes_equal_autograd(family, tiny_dir, tiny_model):
    model = tiny_model(family)
    model.save_context("grads").clear()
    layer = model.n_layers - 1
    grad_probes = {"layers.0.resid_pre": lambda c, g: c.save("resid_pre", g)}
    if any(p.name == f"layers.{layer}.resid_mid" for p in model.probe_points()):
        grad_probes[f"layers.{layer}.resid_mid"] = lambda c, g: c.save("resid_mid", g)
    model.run(IDS, grad_probes=grad_probes, backward=True, save="grads")
    hf = plain(tiny_dir(family))
    out = hf(IDS, output_hidden_states=True)
    loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), IDS[:, 1:].reshape(-1))
    (expected,) = torch.autograd.grad(loss, out.hidden_states[0], retain_graph=True)
    handle = model.save_context("grads")
    torch.testing.assert_close(handle.fetch("resid_pre")[0], expected, atol=1e-6, rtol=1e-5)
    # parameter gradients too
    hf.zero_grad()
    loss.backward()
    raw = next(n for n, _ in hf.named_parameters() if n.endswith("weight") and "embed" not in n)
    torch.testing.assert_close(model.param(raw, grad=True), dict(hf.named_parameters())[raw].grad,
                               atol=1e-6, rtol=1e-5)
    if "resid_mid" in handle:
        # resid_mid gradient = gradient at the next block input + through the MLP branch;
        # check it against autograd on a hooked plain model
        captured = {}
        block = dict(hf.named_modules())[f"{model.executor.adapter.layers}.{layer}"]
        ln2 = dict(block.named_modules())[model.executor.adapter.block_sites["resid_mid"].module]
        h = ln2.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0]))
        out = hf(IDS)
        h.remove()
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB),
                                                 IDS[:, 1:].reshape(-1))
        (g,) = torch.autograd.grad(loss, captured["x"])
        got = handle.fetch("resid_mid")[0]  # OPT's MLP sees (batch * seq, d): compare reshaped
        torch.testing.assert_close(got, g.reshape(got.shape), atol=1e-6, rtol=1e-5)
    handle.clear()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replacing_resid_mid_reaches_the_residual_stream(family, tiny_model):
    model = tiny_model(family)
    plain_logits = model.run(IDS).logits
    zero_mid = model.run(IDS, probes={"layers.1.resid_mid": lambda c, x: torch.zeros_like(x)}).logits
    # with resid_mid zeroed the output only depends on mlp(ln2(0)) -> same logits at every position
    torch.testing.assert_close(zero_mid[:, 0], zero_mid[:, -1], atol=1e-5, rtol=0)
    assert not torch.allclose(plain_logits[:, 0], plain_logits[:, -1])


def test_unknown_architecture_still_offers_module_points(tmp_path):
    """XGLM has no adapter, and discovery proves only its residual stream (its attention does
    not use the AttentionInterface, its MLP is no module): the rest is module points."""
    config = transformers.XGLMConfig(d_model=32, ffn_dim=64, num_layers=2, attention_heads=4,
                                     max_position_embeddings=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    transformers.XGLMForCausalLM(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"'xglm' has no cloche adapter.*attn\.pattern \(the"
                                         r" attention modules do not call"):
        model = cloche.load(tmp_path)
    assert model.executor.adapter.discovered
    assert any(line.startswith("layers.*.attn.pattern: the attention modules do not call")
               for line in model.info()["missing"])
    with pytest.raises(cloche.UnknownProbePoint, match=r"AttentionInterface"):
        model.run(IDS, probes={"layers.0.attn.pattern": lambda c, x: None})
    names = {p.name for p in model.probe_points()}
    assert {"layers.0.resid_pre", "layers.1.resid_post", "logits"} <= names
    assert "module:model.layers.0.fc1:output" in names
    model.run(IDS, probes={"module:model.layers.0.fc1:output": lambda c, x: c.save("fc1", x)},
              save="u")
    assert model.save_context("u").fetch("fc1").shape == (1, 2, 9, 64)


def test_a_model_that_cannot_be_discovered_says_so(tmp_path):
    config = transformers.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                                   vocab_size=VOCAB, decoder_start_token_id=0)
    torch.manual_seed(0)
    transformers.T5Model(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="'t5' has no cloche adapter and its structure could not"
                                         " be discovered"):
        model = cloche.load(tmp_path)
    assert model.executor.adapter is None
    assert any(line.startswith("layers.*.resid_pre: model_type 't5' has no cloche adapter")
               for line in model.info()["missing"])
    with pytest.raises(cloche.UnknownProbePoint, match=r"no cloche adapter.*module:<path>"):
        model.resolve("layers.0.attn.pattern")


def test_transformerlens_aliases(tiny_model):
    model = tiny_model("gpt2")
    assert model.resolve("blocks.1.hook_resid_pre") == "layers.1.resid_pre"
    assert model.resolve("blocks.0.mlp.hook_post") == "layers.0.mlp.post"
    assert model.resolve("blocks.0.attn.hook_pattern") == "layers.0.attn.pattern"
    assert model.resolve("hook_embed") == "embed"
    with pytest.raises(cloche.UnknownProbePoint):
        model.resolve("blocks.9.hook_resid_pre")
    with pytest.raises(cloche.UnknownProbePoint, match="did you mean"):
        model.resolve("layers.0.resid_prex")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_z_without_pattern_probe_uses_the_fused_kernel_and_agrees(family, tiny_model):
    model = tiny_model(family)
    everything = capture_all(model, ["layers.0.attn.z", "layers.0.attn.pattern"])
    alone = capture_all(model, ["layers.0.attn.z"])
    torch.testing.assert_close(alone["layers.0.attn.z"], everything["layers.0.attn.z"],
                               atol=1e-5, rtol=0)
    # replacing z (zeroing head 1) still reaches the output
    def zero_head(ctx, z):
        z = z.clone()
        z[:, :, 1] = 0
        return z
    changed = model.run(IDS, probes={"layers.0.attn.z": zero_head}).logits
    assert not torch.allclose(changed, model.run(IDS).logits)


@pytest.mark.parametrize("family", ["gptj", "phi", "stablelm_parallel", "falcon", "falcon_new",
                                    "cohere"])
def test_parallel_blocks_have_no_resid_mid_and_say_why(family, tiny_model):
    model = tiny_model(family)
    info = model.info()
    assert info["parallel"] is True
    names = {p.name for p in model.probe_points()}
    assert "layers.0.resid_mid" not in names
    # one LayerNorm feeds both branches, except in Falcon-40B's blocks (ln_attn and ln_mlp)
    assert ("layers.0.ln2" in names) == (family == "falcon_new")
    assert any(line.startswith("layers.*.resid_mid: attention and MLP run in parallel")
               for line in info["missing"])
    for name in ("layers.1.resid_mid", "blocks.1.hook_resid_mid"):
        with pytest.raises(cloche.UnknownProbePoint, match="run in parallel"):
            model.resolve(name)
    # resid_post = resid_pre + attn.out + mlp.out
    got = capture_all(model, [f"layers.0.{s}" for s in ("resid_pre", "attn.out", "mlp.out",
                                                         "resid_post")])
    torch.testing.assert_close(got["layers.0.resid_post"], got["layers.0.resid_pre"]
                               + got["layers.0.attn.out"] + got["layers.0.mlp.out"],
                               atol=1e-5, rtol=0)


def test_an_experiment_naming_a_missing_point_says_why(tiny_model):
    from cloche.experiments import ablate

    with pytest.raises(cloche.UnknownProbePoint, match="run in parallel"):
        ablate(tiny_model("phi"), "layers.1.resid_mid", IDS)


def test_sequential_families_describe_no_parallel_blocks(tiny_model):
    info = tiny_model("llama").info()
    assert info["parallel"] is False
    assert not any(line.startswith("layers.*.resid_mid") for line in info["missing"])


# --------------------------------------------------------------------- family quirks
@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "opt"])
def test_learned_positions_read_from_w_pos(family, tiny_model):
    """resid_pre of block 0 is W_E[token] + W_pos[position]; OPT's table is offset by 2."""
    model = tiny_model(family)
    got = capture_all(model, ["layers.0.resid_pre"])["layers.0.resid_pre"]
    W_E, W_pos = model.param("embed.W_E"), model.param("pos_embed.W_pos")
    assert W_pos.shape[0] == model.executor.describe().max_positions == 64
    torch.testing.assert_close(got, W_E[IDS] + W_pos[: IDS.shape[1]], atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_gemma_embeddings_are_scaled_by_sqrt_d_model(family, tiny_model):
    model = tiny_model(family)
    got = capture_all(model, ["embed", "layers.0.resid_pre"])
    expected = model.param("embed.W_E")[IDS] * model.info()["d_model"] ** 0.5
    torch.testing.assert_close(got["embed"], expected, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got["layers.0.resid_pre"], got["embed"], atol=0, rtol=0)


# (family, layer, window): sliding-window layers attend to the last `window` tokens only
SLIDING = [("gemma2", 0, 4), ("gemma3", 0, 4), ("gpt_neo", 1, 4), ("starcoder2", 0, 4)]


@pytest.mark.parametrize(("family", "layer", "window"), SLIDING)
def test_sliding_window_layers_see_only_the_window(family, layer, window, tiny_model):
    model = tiny_model(family)
    pattern = capture_all(model, [f"layers.{layer}.attn.pattern"])[f"layers.{layer}.attn.pattern"]
    q = torch.arange(IDS.shape[1])[:, None]
    k = torch.arange(IDS.shape[1])[None, :]
    outside = (q - k >= window) | (k > q)
    assert outside.any() and torch.all(pattern[..., outside] == 0)
    assert torch.all(pattern[..., ~outside] > 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_gemma2_pattern_is_the_softmax_of_soft_capped_scores(tiny_model):
    model = tiny_model("gemma2")
    cfg = model.hf_model.config.to_dict()
    got = capture_all(model, ["layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.pattern"])
    q, k = got["layers.1.attn.q"], got["layers.1.attn.k"]
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * cfg["query_pre_attn_scalar"] ** -0.5
    cap = cfg["attn_logit_softcapping"]
    capped = torch.tanh(scores / cap) * cap
    causal = torch.ones(IDS.shape[1], IDS.shape[1], dtype=torch.bool).tril()
    expected = capped.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(got["layers.1.attn.pattern"], expected, atol=1e-5, rtol=0)
    # and the caps matter on this model: the uncapped softmax differs, logits are capped
    assert not torch.allclose(scores.masked_fill(~causal, float("-inf")).softmax(-1), expected,
                              atol=1e-2)
    logits = capture_all(model, ["logits"])["logits"]
    assert logits.abs().max() < cfg["final_logit_softcapping"]
    assert logits.abs().max() > 0.5 * cfg["final_logit_softcapping"]


@pytest.mark.parametrize("family", ["gpt2", "gpt_neo", "gemma2", "opt", "bloom", "falcon",
                                    "falcon_new", "falcon_rw"])
def test_a_replaced_pattern_mixes_the_values(family, tiny_model):
    """Replacing attn.pattern changes z to pattern @ v (also where attention is wrapped)."""
    model = tiny_model(family)
    seq = IDS.shape[1]
    uniform = torch.ones(seq, seq).tril()
    uniform = uniform / uniform.sum(-1, keepdim=True)
    ctx = "replaced-pattern"
    model.save_context(ctx).clear()
    model.run(IDS, probes={
        "layers.0.attn.pattern": lambda c, x: uniform.expand_as(x).to(x.dtype),
        "layers.0.attn.v": lambda c, x: c.save("v", x),
        "layers.0.attn.z": lambda c, x: c.save("z", x),
    }, save=ctx)
    handle = model.save_context(ctx)
    v, z = handle.fetch("v")[0], handle.fetch("z")[0]
    handle.clear()
    torch.testing.assert_close(z, torch.einsum("qk,bkhd->bqhd", uniform, v), atol=1e-5, rtol=0)


def test_phi3_gate_chunk_is_mlp_pre(tiny_model):
    """mlp.pre is the gate half of Phi-3's fused gate_up_proj: zeroing a gate zeroes its neuron
    (silu(0) = 0), which is what zeroing the neuron itself does."""
    model = tiny_model("phi3")
    j = 3

    def zero(ctx, x):
        x = x.clone()
        x[..., j] = 0
        return x

    by_gate = model.run(IDS, probes={"layers.1.mlp.pre": zero}).logits
    by_neuron = model.run(IDS, probes={"layers.1.mlp.post": zero}).logits
    torch.testing.assert_close(by_gate, by_neuron, atol=1e-6, rtol=0)
    got = capture_all(model, ["layers.1.mlp.pre", "layers.1.mlp.pre_linear", "layers.1.ln2"])
    torch.testing.assert_close(got["layers.1.mlp.pre"],
                               got["layers.1.ln2"] @ model.param("layers.1.mlp.W_gate"),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(got["layers.1.mlp.pre_linear"],
                               got["layers.1.ln2"] @ model.param("layers.1.mlp.W_in"),
                               atol=1e-5, rtol=0)


# --------------------------------------------------------------------- mixture of experts
def _routing(model, layer):
    """Router logits (batch, seq, experts) and the hidden input of the sparse block."""
    got = capture_all(model, [f"layers.{layer}.mlp.router", f"layers.{layer}.ln2"])
    return got[f"layers.{layer}.mlp.router"], got[f"layers.{layer}.ln2"]


@pytest.mark.parametrize("family", MOE)
def test_router_logits_and_expert_activations(family, tiny_model):
    model = tiny_model(family)
    layer = 1
    logits, x = _routing(model, layer)
    n_experts = logits.shape[-1]
    torch.testing.assert_close(logits, x @ model.param(f"layers.{layer}.mlp.W_router"),
                               atol=1e-5, rtol=0)
    top_k = model.hf_model.config.num_experts_per_tok
    chosen = logits.topk(top_k, dim=-1).indices
    posts = capture_all(model, [f"layers.{layer}.mlp.experts.{e}.post" for e in range(n_experts)])
    gate_up = model.param(f"model.layers.{layer}.mlp.experts.gate_up_proj")
    for e in range(n_experts):
        post = posts[f"layers.{layer}.mlp.experts.{e}.post"]
        routed = (chosen == e).any(-1)
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        expected = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(post[routed], expected[routed], atol=1e-5, rtol=0)
        assert torch.all(post[~routed] == 0)


@pytest.mark.parametrize("family", MOE)
def test_zeroing_an_expert_neuron_equals_zeroing_its_weights(family, tiny_dir, tiny_model):
    model = tiny_model(family)
    layer, e, j = 1, 2, 5

    def zero(ctx, x):
        x = x.clone()
        x[..., j] = 0
        return x

    ablated = model.run(IDS, probes={f"layers.{layer}.mlp.experts.{e}.post": zero}).logits
    edited = cloche.load(tiny_dir(family))
    with torch.no_grad():
        edited.param(f"model.layers.{layer}.mlp.experts.down_proj")[e, :, j] = 0
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)
    # a probe that only reads leaves the output as it was
    read = model.run(IDS, probes={f"layers.{layer}.mlp.experts.{e}.post": lambda c, x: None})
    torch.testing.assert_close(read.logits, model.run(IDS).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", MOE)
def test_expert_weights_are_the_experts_own_in_canonical_layout(family, tiny_model):
    """layers.i.mlp.experts.e.W_gate/W_in (d_model, d_expert), W_out (d_expert, d_model) and
    mlp.W_router (d_model, experts) are the module's own weights, and they make the expert's
    activations at the tokens routed to it."""
    model = tiny_model(family)
    layer = 1
    block = model.hf_model.model.layers[layer].mlp
    experts = block.experts
    d_expert = experts.down_proj.shape[-1]
    d_model = model.info()["d_model"]
    torch.testing.assert_close(model.param(f"layers.{layer}.mlp.W_router"), block.gate.weight.T,
                               atol=0, rtol=0)
    logits, x = _routing(model, layer)
    chosen = logits.topk(model.hf_model.config.num_experts_per_tok, dim=-1).indices
    n_experts = logits.shape[-1]
    posts = capture_all(model, [f"layers.{layer}.mlp.experts.{e}.post" for e in range(n_experts)])
    for e in range(n_experts):
        name = f"layers.{layer}.mlp.experts.{e}"
        gate, up, out = (model.param(f"{name}.{w}") for w in ("W_gate", "W_in", "W_out"))
        assert gate.shape == up.shape == (d_model, d_expert) and out.shape == (d_expert, d_model)
        torch.testing.assert_close(gate, experts.gate_up_proj[e, :d_expert].T, atol=0, rtol=0)
        torch.testing.assert_close(up, experts.gate_up_proj[e, d_expert:].T, atol=0, rtol=0)
        torch.testing.assert_close(out, experts.down_proj[e].T, atol=0, rtol=0)
        routed = (chosen == e).any(-1)
        expected = torch.nn.functional.silu(x @ gate) * (x @ up)
        torch.testing.assert_close(posts[f"{name}.post"][routed], expected[routed], atol=1e-5,
                                   rtol=0)
    assert model.param(f"layers.{layer}.mlp.experts.1.W_in", index=(slice(None), 3)).shape == (
        d_model,)
    with pytest.raises(cloche.UnknownProbePoint):
        model.param(f"layers.{layer}.mlp.experts.{n_experts}.W_in")


@pytest.mark.parametrize("family", MOE)
def test_zeroing_an_expert_output_equals_zeroing_its_w_out(family, tiny_dir, tiny_model):
    """Replacing expert e's whole activation by zeros (its output then vanishes) equals zeroing
    its canonical W_out (a view: the edit reaches the stacked parameter)."""
    model = tiny_model(family)
    layer, e = 1, 1
    ablated = model.run(IDS, probes={
        f"layers.{layer}.mlp.experts.{e}.post": lambda c, x: torch.zeros_like(x)}).logits
    edited = cloche.load(tiny_dir(family))
    with torch.no_grad():
        edited.param(f"layers.{layer}.mlp.experts.{e}.W_out").zero_()
    assert torch.all(edited.param(f"model.layers.{layer}.mlp.experts.down_proj")[e] == 0)
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)


@pytest.mark.parametrize("family", MOE)
def test_replacing_router_logits_reroutes(family, tiny_model):
    """Logits that send every token to experts 0 and 1 give w0 * E0(x) + w1 * E1(x)."""
    model = tiny_model(family)
    layer = 1

    def force(ctx, logits):
        forced = torch.full_like(logits, -1e4)
        forced[..., 0] = 1.0
        forced[..., 1] = 0.0
        return forced

    ctx = "rerouted"
    model.save_context(ctx).clear()
    rerouted = model.run(IDS, save=ctx, probes={
        f"layers.{layer}.mlp.router": force,
        f"layers.{layer}.ln2": lambda c, x: c.save("x", x),
        f"layers.{layer}.mlp.out": lambda c, x: c.save("out", x)}).logits
    handle = model.save_context(ctx)
    x, out = handle.fetch("x")[0], handle.fetch("out")[0]
    handle.clear()
    gate_up = model.param(f"model.layers.{layer}.mlp.experts.gate_up_proj")
    down = model.param(f"model.layers.{layer}.mlp.experts.down_proj")
    w = torch.tensor([1.0, 0.0]).softmax(0)  # renormalised or not: the others are ~0
    expected = torch.zeros_like(x)
    for e in (0, 1):
        gate, up = (x @ gate_up[e].T).chunk(2, dim=-1)
        expected += w[e] * ((torch.nn.functional.silu(gate) * up) @ down[e].T)
    block = model.hf_model.model.layers[layer].mlp
    if hasattr(block, "shared_expert"):  # Qwen2-MoE adds its gated shared expert
        with torch.no_grad():
            expected += torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(rerouted, model.run(IDS).logits)


def test_falcon_alibi_pattern(tiny_model):
    """Falcon-RW's pattern is softmax(q.k / sqrt(d) + ALiBi / sqrt(d) + causal mask), the
    attention its default (sdpa) forward computes. transformers' eager branch, which
    output_attentions uses, adds ALiBi once more on top of the mask that already holds it."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    model = tiny_model("falcon_rw")
    got = capture_all(model, ["layers.1.attn.q", "layers.1.attn.k", "layers.1.attn.pattern"])
    q, k = got["layers.1.attn.q"], got["layers.1.attn.k"]
    heads, d_head = q.shape[2], q.shape[3]
    alibi = build_alibi_tensor(torch.ones_like(IDS), heads, torch.float32)
    alibi = alibi.view(IDS.shape[0], heads, 1, -1)
    scores = (torch.einsum("bqhd,bkhd->bhqk", q, k) + alibi) / d_head**0.5
    causal = torch.ones(IDS.shape[1], IDS.shape[1], dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(got["layers.1.attn.pattern"], expected, atol=1e-5, rtol=0)
    # the slopes matter: without ALiBi the pattern differs
    plain = (torch.einsum("bqhd,bkhd->bhqk", q, k) / d_head**0.5).masked_fill(~causal,
                                                                             float("-inf"))
    assert not torch.allclose(plain.softmax(-1), expected, atol=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_headless_model_of_a_family_whose_logits_are_the_model_output(family, tmp_path):
    """Gemma 2 and Cohere read logits at the model's output (after capping / scaling); saved
    without the head, that output is hidden states, so the model has no logits point."""
    from tests.tiny_models import _configs

    cls, config = _configs()[family]
    torch.manual_seed(0)
    full = cls(config)
    base = full.model
    base.save_pretrained(tmp_path)
    model = cloche.load(tmp_path)
    names = {p.name for p in model.probe_points()}
    assert "logits" not in names and "layers.1.resid_post" in names and "final_norm" in names
    with torch.no_grad():
        expected = base(IDS).last_hidden_state
    got = capture_all(model, ["final_norm"])["final_norm"]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------- fused and inline q/k/v
# families whose query, key and value come out of one fused projection, or whose attention is
# computed inline (cloche writes it out with taps); each layout is rebuilt here from the
# transformers code it mirrors, not from cloche's tables
FUSED = ["gpt_neo", "gpt_neox", "gpt_neox_sequential", "phi3", "bloom", "falcon", "falcon_new",
         "falcon_rw"]


def _qkv_rows(family, config, which, head):
    """Rows of the raw fused q/k/v weight (output features) that make query (0), key (1) or
    value (2) head ``head`` (a key/value head for keys and values), per transformers' code."""
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    span = torch.arange(d)
    if family.startswith("falcon") and config.new_decoder_architecture:
        group = heads // config.num_kv_heads  # [q * group, k, v] per key/value head
        slot = (head % group) if which == 0 else group + which - 1
        owner = head // group if which == 0 else head
        return owner * (group + 2) * d + slot * d + span
    if family == "falcon" and config.multi_query:  # all queries, one key, one value
        return (head if which == 0 else heads + which - 1) * d + span
    if family == "phi3":  # [query heads | key heads | value heads]
        kv = config.num_key_value_heads
        return (0, heads * d, (heads + kv) * d)[which] + head * d + span
    return head * 3 * d + which * d + span  # per head [q, k, v]: GPT-NeoX, BLOOM, Falcon-RW


def _fused_weight(model):
    """(module path of the fused projection in block 0, or of GPT-Neo's q/k/v) per family."""
    adapter = model.executor.adapter
    site = adapter.block_sites.get("attn.q_proj")
    if site is not None and site.qkv is None:
        return None  # separate projections
    base = f"{adapter.layers}.0.{adapter.attention}"
    return f"{base}.qkv_proj" if model.config.model_type == "phi3" else f"{base}.query_key_value"


@pytest.mark.parametrize("family", FUSED)
def test_projection_points_are_the_split_fused_projection(family, tiny_dir, tiny_model):
    """attn.q_proj/k_proj/v_proj are the projection's output per head (key/value heads for keys
    and values), split per the family's layout; k_grouped is the keys before heads are
    expanded; softmax(attn.scores) is the eager pattern, the masked entries -inf."""
    model = tiny_model(family)
    config = model.hf_model.config
    names = [f"layers.0.attn.{s}" for s in ("q_proj", "k_proj", "v_proj", "k_grouped", "k",
                                            "v", "scores", "pattern")]
    got = capture_all(model, names)
    hf = plain(tiny_dir(family), attn_implementation="eager")
    heads = config.num_attention_heads
    d = config.hidden_size // heads
    fused_path = _fused_weight(model)
    captured = {}
    if fused_path is None:  # GPT-Neo: three Linear modules
        base = f"{model.executor.adapter.layers}.0.{model.executor.adapter.attention}"
        for which, proj in (("q_proj", "q_proj"), ("k_proj", "k_proj"), ("v_proj", "v_proj")):
            module = dict(hf.named_modules())[f"{base}.{proj}"]
            module.register_forward_hook(
                lambda m, a, out, w=which: captured.update({w: out.unflatten(-1, (heads, d))}))
        with torch.no_grad():
            eager = hf(IDS, output_attentions=True).attentions[0]
    else:
        module = dict(hf.named_modules())[fused_path]
        module.register_forward_hook(lambda m, a, out: captured.update(fused=out))
        with torch.no_grad():
            eager = hf(IDS, output_attentions=True).attentions[0]
        fused = captured["fused"]
        for which, name in enumerate(("q_proj", "k_proj", "v_proj")):
            n = heads if which == 0 else got[f"layers.0.attn.{name}"].shape[2]
            captured[name] = torch.stack(
                [fused[..., _qkv_rows(family, config, which, h)] for h in range(n)], dim=2)
    for name in ("q_proj", "k_proj", "v_proj"):
        torch.testing.assert_close(got[f"layers.0.attn.{name}"], captured[name], atol=1e-6,
                                   rtol=0, msg=name)
    k_grouped, k = got["layers.0.attn.k_grouped"], got["layers.0.attn.k"]
    group = heads // k_grouped.shape[2]
    torch.testing.assert_close(k_grouped.repeat_interleave(group, dim=2), k, atol=0, rtol=0)
    torch.testing.assert_close(captured["v_proj"].repeat_interleave(group, dim=2),
                               got["layers.0.attn.v"], atol=1e-6, rtol=0)
    # at position 0 the rotary embedding is the identity and ALiBi adds 0: the first score is
    # the scaled dot product of the projections; softmax then fixes every other entry
    scale = 1.0 if family == "gpt_neo" else d**-0.5
    q0 = captured["q_proj"][:, 0]
    k0 = captured["k_proj"][:, 0].repeat_interleave(group, dim=1)
    torch.testing.assert_close(k_grouped[:, 0], captured["k_proj"][:, 0], atol=1e-6, rtol=0)
    scores = got["layers.0.attn.scores"]
    torch.testing.assert_close(scores[:, :, 0, 0], (q0 * k0).sum(-1) * scale, atol=1e-5, rtol=0)
    future = torch.ones(IDS.shape[1], IDS.shape[1], dtype=torch.bool).triu(1)
    assert torch.isneginf(scores[..., future]).all()
    assert torch.isfinite(scores[..., ~future]).all()
    if not known_pattern_divergence(config):  # (Falcon-RW: see test_falcon_alibi_pattern)
        torch.testing.assert_close(scores.softmax(-1), eager, atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.softmax(-1), got["layers.0.attn.pattern"], atol=1e-6,
                               rtol=0)


@pytest.mark.parametrize("family", [f for f in FUSED if f != "gpt_neo"])
@pytest.mark.parametrize("which", [0, 1, 2])
def test_zeroing_a_fused_projection_head_equals_zeroing_its_rows(family, which, tiny_dir,
                                                                  tiny_model):
    """Zeroing head 1 of attn.q_proj (k_proj, v_proj) equals zeroing the rows of the fused
    weight (and bias) that make it: the split is right for edits, not only for reads."""
    model = tiny_model(family)
    point = f"layers.0.attn.{'qkv'[which]}_proj"
    head = 0 if which and model.executor.describe().n_kv_heads == 1 else 1

    def zero(ctx, x):
        x = x.clone()
        x[:, :, head] = 0
        return x

    ablated = model.run(IDS, probes={point: zero}).logits
    edited = cloche.load(tiny_dir(family))
    rows = _qkv_rows(family, edited.hf_model.config, which, head)
    with torch.no_grad():
        edited.param(f"{_fused_weight(edited)}.weight")[rows] = 0
        if f"{_fused_weight(edited)}.bias" in edited.param_names(canonical=False):
            edited.param(f"{_fused_weight(edited)}.bias")[rows] = 0
    torch.testing.assert_close(ablated, edited.run(IDS).logits, atol=1e-5, rtol=0)
    assert not torch.allclose(ablated, model.run(IDS).logits)


@pytest.mark.parametrize("family", FUSED)
def test_replaced_scores_set_the_pattern(family, tiny_model):
    """A probe on attn.scores decides the pattern: uniform scores give uniform attention over
    the visible keys (the -inf entries stay masked)."""
    model = tiny_model(family)
    ctx = "replaced-scores"
    model.save_context(ctx).clear()
    model.run(IDS, save=ctx, probes={
        "layers.0.attn.scores": lambda c, s: torch.where(torch.isfinite(s), 0.0, s),
        "layers.0.attn.pattern": lambda c, p: c.save("p", p)})
    handle = model.save_context(ctx)
    pattern = handle.fetch("p")[0]
    handle.clear()
    uniform = torch.ones(IDS.shape[1], IDS.shape[1]).tril()  # (GPT-Neo's layer 0 is global)
    torch.testing.assert_close(pattern, (uniform / uniform.sum(-1, keepdim=True)).expand_as(pattern),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", [*FUSED, "bert", "roberta"])
def test_projection_points_are_ln1_times_the_canonical_weights(family, tiny_model):
    """W_Q/W_K/W_V (and b_Q/b_K/b_V where the model has biases) in canonical layout,
    (heads, d_model, d_head) with key/value heads for W_K/W_V, make attn.q_proj/k_proj/v_proj
    from what attention reads: ln1, or resid_pre in a post-LayerNorm encoder."""
    model = tiny_model(family)
    read = "layers.1.resid_pre" if family in ("bert", "roberta") else "layers.1.ln1"
    got = capture_all(model, [read, *(f"layers.1.attn.{x}_proj" for x in "qkv")])
    x = got[read]
    n_kv = model.executor.describe().n_kv_heads
    for name in "QKV":
        weight = model.param(f"layers.1.attn.W_{name}")
        heads = model.n_heads if name == "Q" else n_kv
        assert weight.shape == (heads, model.info()["d_model"], model.info()["d_head"])
        try:
            bias = model.param(f"layers.1.attn.b_{name}")
        except cloche.UnknownProbePoint:
            bias = torch.zeros(heads, weight.shape[-1])
        expected = torch.einsum("bsm,hmd->bshd", x, weight) + bias
        torch.testing.assert_close(got[f"layers.1.attn.{name.lower()}_proj"], expected,
                                   atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("family", ["bert", "roberta"])
def test_encoder_positions_read_from_w_pos(family, tiny_model):
    """The embeddings' LayerNorm reads W_E[token] + W_pos[position] + the token-type row;
    RoBERTa's W_pos starts after its padding index (row padding_idx + 1 is position 0), and a
    padding token gets row padding_idx without advancing the positions after it."""
    model = tiny_model(family)
    root = model.executor.adapter.layers.split(".")[0]
    norm = f"module:{root}.embeddings.LayerNorm:input"
    got = capture_all(model, [norm, "pos_embed"])
    W_E, W_pos = model.param("embed.W_E"), model.param("pos_embed.W_pos")
    raw = model.param(f"{root}.embeddings.position_embeddings.weight")
    offset = model.hf_model.config.pad_token_id + 1 if family == "roberta" else 0
    assert W_pos.shape[0] == raw.shape[0] - offset
    torch.testing.assert_close(W_pos, raw[offset:], atol=0, rtol=0)
    token_type = model.param(f"{root}.embeddings.token_type_embeddings.weight")[0]
    seq = IDS.shape[1]
    torch.testing.assert_close(got[norm], W_E[IDS] + W_pos[:seq] + token_type, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["pos_embed"].expand(len(IDS), -1, -1),
                               W_pos[:seq].expand(len(IDS), -1, -1), atol=0, rtol=0)
    if family == "roberta":
        pad = model.hf_model.config.pad_token_id
        padded = IDS.clone()
        padded[:, 3] = pad
        pos = capture(model, padded, ["pos_embed"], context="padded-positions")["pos_embed"]
        torch.testing.assert_close(pos[:, 3], raw[pad].expand(len(IDS), -1), atol=0, rtol=0)
        torch.testing.assert_close(pos[:, 4], W_pos[3].expand(len(IDS), -1), atol=0, rtol=0)
