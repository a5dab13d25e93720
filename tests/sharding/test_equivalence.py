"""A model sharded over 2 and 3 gloo ranks gives what the single-process model gives."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.data import Dataset
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS
from tests.tiny_models import VOCAB

ATOL = 1e-5
# GPT-2 (tied embeddings, learned positions) on 2 and 3 ranks; Llama (rotary, grouped-query
# attention) on 3 ranks, so a middle rank holds rotary blocks that neither embed nor unembed.
CONFIGS = [("gpt2", 2, None), ("gpt2", 3, (1, 2, 1)), ("llama", 3, None)]


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-ws{c[1]}")
def pair(request, tiny4_dir):
    family, world_size, layers = request.param
    directory = tiny4_dir(family)
    model = start_local(directory, world_size, layers_per_rank=layers, timeout_s=TIMEOUT_S,
                        threads=TORCH_THREADS)
    try:
        yield cloche.load(directory), model
    finally:
        model.close()
    assert {r: p.returncode for r, p in model.executor.group.processes.items()} == \
        dict.fromkeys(range(1, world_size), 0)  # workers shut down cleanly


def close(a, b):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def saver(ctx, x):
    ctx.save(ctx.point, x)


def zero_neuron(ctx, x):
    x = x.clone()
    x[..., 3] = 0
    return x


def test_logits_and_loss(pair):
    local, dist = pair
    inputs = ids_batch()
    got, want = dist.run(inputs), local.run(inputs)
    close(got.logits, want.logits)
    assert got.loss == pytest.approx(want.loss, abs=ATOL)
    split = dist.run(inputs, micro_batches=3)
    close(split.logits, want.logits)
    lean = dist.run(inputs, return_logits=False, return_loss=True)  # the loss, no logits
    assert lean.logits is None and lean.loss == pytest.approx(want.loss, abs=ATOL)
    nothing = dist.run(inputs, return_logits=False)
    assert nothing.logits is None and nothing.loss is None


def test_every_canonical_point_is_captured_identically(pair):
    local, dist = pair
    names = [p.name for p in local.probe_points() if not p.name.startswith("module:")]
    assert [p.name for p in dist.probe_points() if not p.name.startswith("module:")] == names
    owners = {dist.owner_of(n) for n in names}
    assert owners == set(range(dist.world_size))
    inputs = ids_batch(seed=2)
    for model in (local, dist):
        model.save_context("all").clear()
        model.run(inputs, probes=dict.fromkeys(names, saver), save="all")
    want, got = local.save_context("all"), dist.save_context("all")
    assert got.keys() == want.keys() == sorted(names)
    for name in names:
        close(got.fetch(name), want.fetch(name))
    close(got["layers.1.mlp.post"][0, :, -1, 5:9].fetch(),
          want["layers.1.mlp.post"][0, :, -1, 5:9].fetch())
    local.save_context("all").clear()
    got.clear()
    assert "all" not in dist.save_contexts()


def test_ablation_on_every_rank(pair):
    local, dist = pair
    inputs = ids_batch(seed=3)
    probes = {f"layers.{i}.mlp.post": zero_neuron for i in range(local.n_layers)}
    plain = local.run(inputs).logits
    want = local.run(inputs, probes=probes).logits
    got = dist.run(inputs, probes=probes).logits
    assert (want - plain).abs().max() > 1e-4  # the ablation changes something
    close(got, want)


def test_activation_and_parameter_gradients(pair):
    local, dist = pair
    inputs = ids_batch(seed=4)
    grad_probes = {f"layers.{i}.resid_pre": saver for i in range(local.n_layers)}
    for model in (local, dist):
        model.save_context("g").clear()
        model.run(inputs, grad_probes=grad_probes, backward=True, save="g")
    for name in grad_probes:
        close(dist.save_context("g").fetch(name), local.save_context("g").fetch(name))
    weights = ["embed.W_E", "unembed.W_U", "ln_final.w",
               *(f"layers.{i}.mlp.W_in" for i in range(local.n_layers)), "layers.2.attn.W_Q"]
    for name in weights:
        close(dist.param(name), local.param(name))
        close(dist.param(name, grad=True), local.param(name, grad=True))

    def objective(out):
        return out.logits[:, -1, 7].sum()

    local.run(inputs, backward=objective)
    dist.run(inputs, backward=objective)
    close(dist.param("layers.0.mlp.W_out", grad=True), local.param("layers.0.mlp.W_out", grad=True))
    local.save_context("g").clear()
    dist.save_context("g").clear()


def test_generate(pair):
    local, dist = pair
    prompt = torch.tensor([5, 17, 42, 9])
    want, got = local.generate(prompt, 8), dist.generate(prompt, 8)
    assert torch.equal(got.tokens, want.tokens)
    batch = {"input_ids": torch.tensor([[2, 5, 17, 42], [8, 17, 42, 9]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    assert torch.equal(dist.generate(batch, 6).tokens, local.generate(batch, 6).tokens)
    sampled = [m.generate(prompt, 6, temperature=1.0, seed=3).tokens for m in (local, dist)]
    assert torch.equal(sampled[0], sampled[1])
    name = f"layers.{local.n_layers - 1}.resid_post"
    for model in (local, dist):
        model.save_context("gen").clear()
        model.generate(prompt, 3, probes={name: lambda c, x: c.save("last", x[:, -1])},
                       save="gen")
    close(dist.save_context("gen").fetch("last"), local.save_context("gen").fetch("last"))


def steer_first_block(ctx, x):
    return x + torch.linspace(-1.0, 1.0, x.shape[-1])


def save_step(ctx, x):
    """Every decode step: the activation, the step's tokens and mask as the probe sees them."""
    ctx.save(ctx.point, x[:, -1])
    ctx.save(f"tokens@{ctx.point}", ctx.tokens.clone())
    ctx.save(f"mask@{ctx.point}", ctx.attention_mask.clone())


def test_generate_with_probes_on_every_rank(pair):
    """Only rank 0 runs the decode loop; the other ranks' probes fire at every step as locally."""
    local, dist = pair
    names = [f"layers.{i}.resid_post" for i in range(local.n_layers)]
    assert {dist.owner_of(n) for n in names} == set(range(dist.world_size))
    probes = {"layers.0.resid_pre": steer_first_block, **dict.fromkeys(names, save_step)}
    batch = {"input_ids": torch.tensor([[2, 5, 17, 42], [8, 17, 42, 9]]),
             "attention_mask": torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])}
    plain = local.generate(batch, 5).tokens
    outs = []
    for model in (local, dist):
        model.save_context("steps").clear()
        outs.append(model.generate(batch, 5, probes=probes, save="steps").tokens)
    assert torch.equal(outs[1], outs[0]) and not torch.equal(outs[0], plain)  # it steered
    want, got = local.save_context("steps"), dist.save_context("steps")
    keys = want.keys()
    assert got.keys() == keys and len(keys) == 3 * local.n_layers
    for key in keys:
        a, b = want.fetch(key, "list"), got.fetch(key, "list")
        assert len(a) == len(b) == 5  # the prompt, then one step per new token but the last
        for x, y in zip(a, b, strict=True):
            if x.is_floating_point():
                close(y, x)
            else:
                assert torch.equal(y, x)
    assert got.num_runs == want.num_runs == 1
    for model in (local, dist):
        model.save_context("steps").clear()


def _dataset():
    g = torch.Generator().manual_seed(5)
    examples = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist()
                for n in torch.randint(4, 12, (11,), generator=g)]
    return Dataset(examples, name="random", seq_len=12, pad_id=2)


def reduce_all(ctx, x):
    ctx.reduce(f"var:{ctx.point}", x, cloche.Variance())
    ctx.reduce(f"top:{ctx.point}", x, cloche.TopK(k=3))
    ctx.state[ctx.point] = ctx.state.get(ctx.point, 0) + int(x.shape[0])


def test_dataset_reductions(pair):
    local, dist = pair
    probes = {"embed": reduce_all, "layers.1.mlp.post": reduce_all,
              f"layers.{local.n_layers - 1}.resid_post": reduce_all, "logits": reduce_all}
    results = []
    for model in (local, dist):
        model.save_context("ds").clear()
        results.append(model.run_dataset(_dataset(), probes=probes, save="ds", batch_size=4))
    want, got = results
    assert got["examples"] == want["examples"] and got["tokens"] == want["tokens"]
    assert got["state"] == want["state"]
    assert set(got["reducers"]) == set(want["reducers"])
    for name, values in want["reducers"].items():
        for field, value in values.items():
            if value.is_floating_point():
                close(got["reducers"][name][field], value)
            else:
                assert torch.equal(got["reducers"][name][field], value), (name, field)
    local.save_context("ds").clear()
    dist.save_context("ds").clear()


def test_saves_from_several_ranks_keep_single_process_order(pair):
    local, dist = pair
    first, last = "embed", f"layers.{local.n_layers - 1}.resid_post"

    def tag(ctx, x):
        ctx.save("both", x[:, :2, :4])

    for model in (local, dist):
        model.save_context("o").clear()
        for seed in (6, 7):
            model.run(ids_batch(seed=seed), probes={first: tag, last: tag}, save="o")
    want, got = local.save_context("o"), dist.save_context("o")
    close(got.fetch("both"), want.fetch("both"))
    assert got.num_runs == want.num_runs == 2
    assert got.nbytes == want.nbytes
    want.clear()
    got.clear()


def test_probe_error_names_point_and_rank_and_rolls_back(pair):
    local, dist = pair
    point = f"layers.{local.n_layers - 1}.mlp.out"

    def broken(ctx, x):
        raise RuntimeError("boom")

    dist.save_context("e").clear()
    with pytest.raises(cloche.ProbeError) as info:
        dist.run(ids_batch(), probes={"embed": saver, point: broken}, save="e")
    assert info.value.point == point and info.value.rank == dist.world_size - 1
    assert "boom" in str(info.value)
    assert dist.save_context("e").keys() == []
    close(dist.run(ids_batch()).logits, local.run(ids_batch()).logits)


def fail_at_third_step(ctx, x):
    """Fails on the rank that follows rank 0's decode loop, two steps into the generation."""
    if ctx.tokens.shape[1] == 1 and ctx.state.setdefault("steps", 0) >= 1:
        raise RuntimeError("boom at a decode step")
    ctx.state["steps"] = ctx.state.get("steps", 0) + int(ctx.tokens.shape[1] == 1)


def test_a_probe_failing_mid_generation_is_reported_and_rolled_back(pair):
    local, dist = pair
    point = f"layers.{local.n_layers - 1}.mlp.out"
    prompt = torch.tensor([5, 17, 42, 9])
    dist.save_context("eg").clear()
    with pytest.raises(cloche.ProbeError) as info:
        dist.generate(prompt, 6, probes={"embed": saver, point: fail_at_third_step}, save="eg")
    assert info.value.point == point and info.value.rank == dist.world_size - 1
    assert "boom at a decode step" in str(info.value)
    assert dist.save_context("eg").keys() == [] and dist.save_context("eg").state == {}
    assert torch.equal(dist.generate(prompt, 6).tokens, local.generate(prompt, 6).tokens)


def test_reads_follow_every_change_of_a_context(pair):
    """Rank 0 keeps where each key lives between commands; every command makes it ask again."""
    local, dist = pair
    last = f"layers.{local.n_layers - 1}.mlp.out"
    handle = dist.save_context("seen")
    handle.clear()
    dist.run(ids_batch(), probes={last: saver}, save="seen", return_logits=False)
    assert handle.keys() == [last] and handle.fetch(last).shape[0] == 1
    dist.run(ids_batch(), probes={last: saver, "embed": saver}, save="seen",
             return_logits=False)
    assert handle.keys() == sorted(["embed", last]) and handle.fetch(last).shape[0] == 2
    assert handle.num_runs == 2
    handle.clear()
    assert handle.keys() == []
    with pytest.raises(cloche.UsageError, match="has no key"):
        handle.fetch(last)


def test_call_and_params_by_rank(pair):
    local, dist = pair

    def layers_here(m):
        return sorted({int(n.split(".")[2]) for n in m.param_names(canonical=False)
                       if n.split(".")[2:3] and n.split(".")[2].isdigit()})

    per_rank = dist.call(layers_here, rank="all")
    assert sorted(per_rank) == list(range(dist.world_size))
    owned = [layer for r in sorted(per_rank) for layer in per_rank[r]]
    assert owned == list(range(local.n_layers))
    assert dist.call(lambda m, k: m.n_layers * k, 2) == 2 * local.n_layers
    assert dist.call(lambda m: m.rank, rank=dist.world_size - 1) == dist.world_size - 1
    assert dist.info()["world_size"] == dist.world_size
