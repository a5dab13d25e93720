"""Runs: probes, errors, detaching, transactions, generation, dataset runs, cancellation."""

from __future__ import annotations

import threading

import cloche
import pytest
import torch
import transformers
from cloche import data
from tests.tiny_models import VOCAB

IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))


def hooks_left(model: cloche.Model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.hf_model.modules())


@pytest.fixture
def gpt2(tiny_model):
    model = tiny_model("gpt2")
    yield model
    for name in model.save_contexts():
        model.save_context(name).clear()
    assert hooks_left(model) == 0


def test_probe_error_names_point_and_leaves_no_hook(gpt2):
    plain = gpt2.run(IDS).logits

    def broken(ctx, x):
        ctx.save("partial", x)
        raise KeyError("no such thing")

    with pytest.raises(cloche.ProbeError) as info:
        gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: c.save("before", x),
                              "blocks.1.hook_resid_pre": broken})
    err = info.value
    assert err.point == "layers.1.resid_pre"
    assert "broken" in err.probe and "KeyError" in str(err)
    assert isinstance(err.__cause__, KeyError)
    assert hooks_left(gpt2) == 0
    assert torch.equal(gpt2.run(IDS).logits, plain)
    # the failed run wrote nothing: its saves were rolled back with it
    assert gpt2.save_context().keys() == []


def test_attention_probe_error_restores_the_attention_implementation(gpt2):
    before = gpt2.config._attn_implementation
    with pytest.raises(cloche.ProbeError):
        gpt2.run(IDS, probes={"layers.0.attn.pattern": lambda c, x: 1 / 0})
    assert gpt2.config._attn_implementation == before


def test_probes_on_one_point_apply_in_order(gpt2):
    seen = []

    def double(ctx, x):
        return x * 2

    def record(ctx, x):
        seen.append(x)

    gpt2.run(IDS, probes={"layers.0.mlp.out": [record, double, record]})
    torch.testing.assert_close(seen[1], seen[0] * 2)


def test_bad_replacement_is_a_clear_error(gpt2):
    with pytest.raises(cloche.ProbeError, match=r"returned shape \(2, 9\), expected \(2, 9, 32\)"):
        gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: x[..., 0]})
    with pytest.raises(cloche.ProbeError, match="returned str"):
        gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: "nope"})
    with pytest.raises(cloche.UsageError, match="not callable"):
        gpt2.run(IDS, probes={"layers.0.mlp.out": 3})
    with pytest.raises(cloche.UsageError):
        gpt2.run(torch.tensor([[0.5, 1.0]]))
    with pytest.raises(cloche.UsageError, match="gradient probes need a backward"):
        gpt2.run(IDS, grad_probes={"layers.0.mlp.out": lambda c, g: None})


def test_save_contexts_accumulate_and_expose_run_metadata(gpt2):
    def probe(ctx, x):
        ctx.save("last", x[:, -1])
        ctx.state["calls"] = ctx.state.get("calls", 0) + 1
        ctx.state.setdefault("runs", []).append(ctx.run_index)
        assert ctx.point == "layers.1.mlp.post" and ctx.layer == 1
        assert torch.equal(ctx.tokens, IDS)

    for _ in range(3):
        gpt2.run(IDS, probes={"blocks.1.mlp.hook_post": probe}, save="acc")
    handle = gpt2.save_context("acc")
    assert handle.num_runs == 3 and handle.keys() == ["last"]
    assert handle.state == {"calls": 3, "runs": [0, 1, 2]}
    stacked = handle.fetch("last")
    assert stacked.shape == (3, 2, 128)
    assert handle.fetch("last", mode="cat").shape == (6, 128)
    assert len(handle.fetch("last", mode="list")) == 3
    sliced = handle["last"][:, -1, 42].to(torch.float16).fetch()
    assert sliced.dtype == torch.float16 and torch.equal(sliced, stacked[:, -1, 42].half())
    assert handle.nbytes == stacked.numel() * 4
    assert "acc" in gpt2.save_contexts()


def test_saving_a_view_keeps_only_the_view(gpt2):
    gpt2.run(IDS, probes={"layers.0.mlp.post": lambda c, x: c.save("one", x[0, 0, :4])}, save="v")
    value = gpt2.save_context("v").fetch("one", mode="list")[0]
    assert value.untyped_storage().nbytes() == 16


def test_reducers_from_probes_equal_direct_computation(gpt2):
    def probe(ctx, x):
        ctx.reduce("mean", x, cloche.Mean())
        ctx.reduce("top", x, cloche.TopK(3))

    batches = [IDS, IDS.flip(0), IDS[:, :5]]
    for ids in batches:
        gpt2.run(ids, probes={"layers.0.mlp.post": probe}, save="red")
    gpt2.run(IDS, probes={"layers.0.mlp.post": lambda c, x: c.save("x", x)}, save="raw")
    rows = []
    for ids in batches:
        gpt2.save_context("raw").clear()
        gpt2.run(ids, probes={"layers.0.mlp.post": lambda c, x: c.save("x", x)}, save="raw")
        rows.append(gpt2.save_context("raw").fetch("x")[0].reshape(-1, 128))
    rows = torch.cat(rows).double()
    result = gpt2.save_context("red").result("mean")
    torch.testing.assert_close(result["mean"], rows.mean(0))
    assert int(result["count"]) == rows.shape[0]


def test_transactions_roll_back_state_and_reducers(gpt2):
    def good(ctx, x):
        ctx.state["n"] = ctx.state.get("n", 0) + 1
        ctx.reduce("m", x, cloche.Mean())

    gpt2.run(IDS, probes={"layers.0.mlp.out": good}, save="t")
    before = gpt2.save_context("t").result("m")
    with pytest.raises(cloche.ProbeError):
        gpt2.run(IDS, probes={"layers.0.mlp.out": good, "layers.1.mlp.out": lambda c, x: 1 / 0},
                 save="t")
    handle = gpt2.save_context("t")
    assert handle.state == {"n": 1} and handle.num_runs == 1
    torch.testing.assert_close(handle.result("m")["mean"], before["mean"])


def test_persist_and_restore_round_trip(gpt2, tmp_path):
    def probe(ctx, x):
        ctx.save("x", x)
        ctx.state["note"] = "hello"
        ctx.state["sum"] = x.sum(0) if "sum" not in ctx.state else ctx.state["sum"] + x.sum(0)
        ctx.reduce("var", x, cloche.Variance())

    for _ in range(2):
        gpt2.run(IDS, probes={"layers.0.resid_post": probe}, save="p")
    handle = gpt2.save_context("p")
    handle.persist(tmp_path / "p.safetensors")
    other = gpt2.save_context("q")
    other.restore(tmp_path / "p.safetensors")
    assert torch.equal(other.fetch("x"), handle.fetch("x"))
    assert other.state["note"] == "hello" and torch.equal(other.state["sum"], handle.state["sum"])
    torch.testing.assert_close(other.result("var")["var"], handle.result("var")["var"])
    assert other.num_runs == 2


def test_memory_cap_is_a_clear_error_and_loses_nothing(tiny_dir):
    model = cloche.load(tiny_dir("gpt2"), max_saved_bytes=10_000)
    model.run(IDS, probes={"layers.0.mlp.out": lambda c, x: c.save("x", x)}, save="m")  # 2.3 kB
    with pytest.raises(cloche.ResourceLimit, match="limit of 10000 bytes"):
        model.run(IDS, probes={"layers.0.mlp.post": lambda c, x: c.save("y", x)}, save="m")
    assert model.save_context("m").keys() == ["x"]


def test_generate_greedy_matches_hf_and_steering_changes_it(gpt2, tiny_dir):
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir("gpt2")).eval()
    prompt = IDS[0, :4]
    expected = hf.generate(prompt[None], max_new_tokens=6, do_sample=False, pad_token_id=2)[0]
    got = gpt2.generate(prompt, max_new_tokens=6)
    assert torch.equal(got.tokens, expected)
    steps = []

    def steer(ctx, x):
        steps.append(ctx.tokens.shape[1])
        return x + 5 * gpt2.param("embed.W_E")[7]

    steered = gpt2.generate(prompt, max_new_tokens=6, probes={"layers.1.resid_pre": steer})
    assert not torch.equal(steered.tokens, expected)
    assert steps[0] == 4 and set(steps[1:]) == {1}  # the prompt, then one token per step (KV cache)


def test_backward_callable_and_param_gradients(gpt2):
    def objective(out):
        return out.logits[:, -1, 5].sum()

    gpt2.run(IDS, backward=objective, grad_probes={"logits": lambda c, g: c.save("g", g)}, save="b")
    g = gpt2.save_context("b").fetch("g")[0]
    assert g[:, -1, 5].eq(1).all() and g.abs().sum() == 2
    assert gpt2.param("unembed.W_U", grad=True).shape == (32, VOCAB)


def test_cancel_between_layers_rolls_back(gpt2):
    cancel = threading.Event()

    def cancel_after_layer0(ctx, x):
        ctx.save("x", x)
        cancel.set()

    with pytest.raises(cloche.Cancelled):
        gpt2.run(IDS, probes={"layers.0.resid_post": cancel_after_layer0}, save="c", cancel=cancel)
    assert gpt2.save_context("c").keys() == []


def test_dataset_runs_reduce_over_all_examples(gpt2):
    examples = [list(range(3 + i, 3 + i + 8 + i % 3)) for i in range(10)]
    ds = data.Dataset(examples, name="ids", seq_len=16, pad_id=2)
    events = []

    def probe(ctx, x):
        ctx.reduce("top", x, cloche.TopK(2))
        ctx.reduce("mean", x, cloche.Mean())

    out = gpt2.run_dataset(ds, probes={"layers.1.mlp.post": probe}, batch_size=4, save="ds",
                           progress=events.append)
    assert out["examples"] == 10 and out["tokens"] == sum(len(e) for e in examples)
    assert [e["done"] for e in events if e["type"] == "progress"] == [4, 8, 10]
    # padding is excluded: the mean equals the mean over real tokens, computed one by one
    rows = []
    for e in examples:
        gpt2.run(torch.tensor(e), probes={"layers.1.mlp.post": lambda c, x: c.save("x", x[0])},
                 save="one")
        rows.append(gpt2.save_context("one").fetch("x", mode="list")[-1])
    rows = torch.cat(rows).double()
    torch.testing.assert_close(out["reducers"]["mean"]["mean"], rows.mean(0), atol=1e-6, rtol=1e-6)


def test_dataset_run_cancel_rolls_back_everything(gpt2):
    ds = data.Dataset([list(range(3, 12))] * 6, name="same", seq_len=9, pad_id=2)
    cancel = threading.Event()
    seen = []

    def probe(ctx, x):
        ctx.reduce("mean", x, cloche.Mean())
        seen.append(1)
        if len(seen) == 2:
            cancel.set()

    with pytest.raises(cloche.Cancelled):
        gpt2.run_dataset(ds, probes={"layers.0.mlp.out": probe}, batch_size=2, save="dc",
                         cancel=cancel)
    assert gpt2.save_context("dc").reducers() == {}


def test_call_runs_next_to_the_model(gpt2):
    assert gpt2.call(lambda m, k: m.param("layers.0.mlp.W_in").shape[k], 1) == 128
    with pytest.raises(cloche.CallError, match="ZeroDivisionError"):
        gpt2.call(lambda m: 1 / 0)


def test_a_reducer_name_keeps_its_kind(gpt2):
    gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: c.reduce("r", x, cloche.Mean())}, save="k")
    with pytest.raises(cloche.UsageError, match="already holds a mean"):
        gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: c.reduce("r", x, cloche.MinMax())},
                 save="k")
    with pytest.raises(cloche.UsageError, match="already holds a mean"):
        gpt2.run(IDS, probes={"layers.0.mlp.out": lambda c, x: c.reduce("s", x, cloche.Mean()),
                              "layers.1.mlp.out": lambda c, x: c.reduce("s", x, cloche.MinMax())},
                 save="k")
    assert gpt2.save_context("k").result("r")["count"] == 18


def test_an_error_in_shipped_code_is_a_call_error_and_in_a_probe_a_probe_error(tiny_model):
    from cloche.errors.payload import from_payload, to_payload

    model = tiny_model("gpt2")

    def broken(m):
        return 1 / 0

    with pytest.raises(cloche.CallError, match="ZeroDivisionError") as info:
        model.call(broken)
    assert isinstance(info.value, cloche.UserCodeError) and info.value.probe.endswith("broken")
    again = from_payload(to_payload(info.value, 7))  # the same class after the wire or a rank
    assert type(again) is cloche.CallError and again.probe == info.value.probe
    with pytest.raises(cloche.ProbeError) as probe_info:
        model.run(torch.tensor([[3, 4]]), probes={"embed": lambda c, x: 1 / 0})
    assert isinstance(probe_info.value, cloche.UserCodeError)


def test_a_handles_repr_shows_runs_keys_and_the_stacking_axis(tiny_model):
    model = tiny_model("gpt2")
    handle = model.save_context("repr-test")
    handle.clear()
    for _ in range(2):
        model.run(torch.tensor([[3, 4, 5]]), probes={"embed": lambda c, x: c.save("x", x)},
                  save="repr-test")
    text = repr(handle)
    assert "2 run(s)" in text and "'x'" in text and "new first axis" in text
    assert handle.fetch("x").shape == (2, 1, 3, model.d_model)  # (entries, *entry shape)
    handle.clear()


def lm_head_rows(model: cloche.Model, **run_kwargs) -> int:
    """How many positions per row went through the unembedding in one run."""
    rows: list[int] = []
    handle = model.hf_model.lm_head.register_forward_hook(
        lambda module, args, out: rows.append(args[0].shape[1]))
    try:
        model.run(IDS, **run_kwargs)
    finally:
        handle.remove()
    return rows[0]


def test_what_is_computed_follows_what_is_asked(gpt2):
    """return_logits=False computes neither loss nor logits nobody asked for; probes see the
    same values; return_loss=True gives the loss without shipping logits."""
    full = gpt2.run(IDS, probes={"final_norm": lambda c, x: c.save("x", x)}, save="full")
    lean = gpt2.run(IDS, probes={"final_norm": lambda c, x: c.save("x", x)}, save="lean",
                    return_logits=False)
    assert lean.logits is None and lean.loss is None
    assert torch.equal(gpt2.save_context("full").fetch("x"), gpt2.save_context("lean").fetch("x"))
    assert gpt2.run(IDS, return_logits=False, return_loss=True).loss == pytest.approx(
        full.loss, abs=1e-6)
    assert lm_head_rows(gpt2) == IDS.shape[1]
    assert lm_head_rows(gpt2, return_logits=False) == 1  # the unembedding skipped
    assert lm_head_rows(gpt2, return_logits=False, return_loss=True) == IDS.shape[1]
    # a probe that reads the logits gets every position, as in the plain forward
    seen = gpt2.run(IDS, probes={"logits": lambda c, x: c.save("logits", x)}, save="head",
                    return_logits=False)
    assert seen.logits is None
    assert torch.equal(gpt2.save_context("head").fetch("logits")[0], full.logits)
