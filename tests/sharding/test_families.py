"""Families with their own quirks, sharded over 2 gloo ranks, give what one process gives.

OPT (flattened MLP sites, offset positions), Gemma 2 (scaled embeddings, soft-capped attention
and logits at the model's output, sliding window), Phi-3 (points that are chunks of a fused
output), Falcon (parallel blocks, an MLP output edited in place), BLOOM (blocks that return
tuples, ALiBi) and Mixtral and Qwen2-MoE (router and tapped experts; their checkpoints hold the
experts one by one, as transformers saves them), and Helium and CodeGen (no adapter: their
structure is discovered), each with 4 blocks so that both ranks hold two.
"""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.sharding.launch import start_local

from tests.sharding.conftest import TIMEOUT_S, ids_batch
from tests.threads import TORCH_THREADS
from tests.tiny_models import save_tiny

ATOL = 1e-5
# Helium and CodeGen have no adapter: discovery finds their structure
DISCOVERED = ["helium", "codegen"]
FAMILIES = ["opt", "gemma2", "phi3", "falcon", "bloom", "mixtral", "qwen2_moe", *DISCOVERED]


def _save_discovered(family, directory):
    import transformers as t

    from tests.tiny_models import _COMMON

    cls, config = {
        "helium": (t.HeliumForCausalLM, t.HeliumConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, **_COMMON)),
        "codegen": (t.CodeGenForCausalLM, t.CodeGenConfig(
            n_layer=4, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, **_COMMON)),
    }[family]
    torch.manual_seed(0)
    cls(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    family = request.param
    directory = tmp_path_factory.mktemp(f"{family}4")
    if family in DISCOVERED:  # both say it loudly at load (rank 0 runs in this process)
        _save_discovered(family, directory)
        with pytest.warns(UserWarning, match="no cloche adapter; cloche discovered its"):
            local = cloche.load(directory)
        with pytest.warns(UserWarning, match="no cloche adapter; cloche discovered its"):
            model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    else:
        save_tiny(family, directory, n_layers=4)
        local = cloche.load(directory)
        model = start_local(directory, 2, timeout_s=TIMEOUT_S, threads=TORCH_THREADS)
    try:
        yield local, model
    finally:
        model.close()


def saver(ctx, x):
    ctx.save(ctx.point, x)


def test_every_canonical_point_logits_and_gradients_agree(pair):
    local, dist = pair
    names = [p.name for p in local.probe_points() if not p.name.startswith("module:")]
    assert [p.name for p in dist.probe_points() if not p.name.startswith("module:")] == names
    assert {dist.owner_of(n) for n in names} == {0, 1}
    inputs = ids_batch(seed=2)
    for model in (local, dist):
        model.save_context("all").clear()
        model.run(inputs, probes=dict.fromkeys(names, saver), save="all")
    want, got = local.save_context("all"), dist.save_context("all")
    assert got.keys() == want.keys() == sorted(names)
    for name in names:
        torch.testing.assert_close(got.fetch(name), want.fetch(name), atol=ATOL, rtol=0)
    want.clear()
    got.clear()
    torch.testing.assert_close(dist.run(inputs).logits, local.run(inputs).logits, atol=ATOL,
                               rtol=0)
    grad_probes = {f"layers.{i}.resid_pre": saver for i in range(local.n_layers)}
    for model in (local, dist):
        model.save_context("g").clear()
        model.run(inputs, grad_probes=grad_probes, backward=True, save="g")
    for name in grad_probes:
        torch.testing.assert_close(dist.save_context("g").fetch(name),
                                   local.save_context("g").fetch(name), atol=ATOL, rtol=1e-5)
    local.save_context("g").clear()
    dist.save_context("g").clear()


def test_canonical_weights_agree(pair):
    """Every canonical weight (per-head attention, Falcon's fused q/k/v, each expert's
    W_gate/W_in/W_out) is read from the rank that holds it, as one process reads it."""
    local, dist = pair
    raw = set(local.param_names(canonical=False))
    names = [n for n in local.param_names() if n not in raw]
    assert [n for n in dist.param_names() if n not in raw] == names
    for name in names:
        torch.testing.assert_close(dist.param(name), local.param(name), atol=0, rtol=0, msg=name)


def test_a_discovered_decoder_says_what_it_lacks_as_in_one_process(pair):
    """A family without an adapter (Helium: sequential, Llama-like; CodeGen: parallel blocks)
    is split by layers with the structure discovery finds on a two-block copy (no process holds
    the whole model): the points, values and weights are checked above like every family's,
    and the statement of what it lacks is the one process's."""
    local, dist = pair
    if not local.executor.adapter.discovered:
        assert not dist.info()["missing"] or dist.info()["missing"] == local.info()["missing"]
        return
    assert dist.info()["missing"] == local.info()["missing"] != []
    assert any("two-block copy" in note for note in dist.info()["notes"])
    names = {p.name for p in dist.probe_points()}
    assert {"layers.3.resid_post", "layers.0.attn.out", "layers.2.mlp.post", "final_norm",
            "logits"} <= names

def test_a_model_that_cannot_be_discovered_is_refused_with_the_reason(tmp_path):
    """T5 (an encoder-decoder) has no adapter and no discoverable block list: sharding it by
    layers is refused before any rank starts, with the reason and the alternative."""
    import transformers as t
    from cloche.errors import UsageError
    from cloche.sharding.shard import skeleton

    from tests.tiny_models import VOCAB

    config = t.T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                        vocab_size=VOCAB, decoder_start_token_id=0)
    torch.manual_seed(0)
    t.T5Model(config).save_pretrained(tmp_path)
    with pytest.raises(UsageError, match=r"'t5' has no cloche adapter and its structure could"
                                         r" not be discovered.*load it in one process"):
        skeleton(tmp_path)
