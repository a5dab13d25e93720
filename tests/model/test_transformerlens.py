"""TransformerLens names mean in cloche what they mean in TransformerLens 4 (checked against it).

The same saved tiny model is loaded by cloche and by TransformerLens' bridge (in compatibility
mode without weight processing, i.e. HookedTransformer's hooks on the unchanged weights); every
TL hook name cloche accepts must give TL's tensor, a replacement there must change the output as
it does in TL, and TL weight names must give TL's weights.
"""

from __future__ import annotations

import logging
import warnings

import cloche
import pytest
import torch
import transformers
from cloche.errors import UnknownProbePoint
from tests.tiny_models import VOCAB, save_tiny

# importing TransformerLens' bridge quiets transformers' logger and adds a warnings filter for
# the whole process; keep both as they were, so that other tests still see what they check
_transformers_level = logging.getLogger("transformers").level
with warnings.catch_warnings():  # transformer-lens is in the test extra: missing is a failure
    import transformer_lens.model_bridge as tl_bridge
    import transformer_lens.model_bridge.sources.transformers.source  # noqa: F401
logging.getLogger("transformers").setLevel(_transformers_level)

# GPT-2, a Llama with grouped-query attention and Qwen2 must offer every alias (REQUIRED_*);
# the others are checked on whatever aliases their adapters offer
# (Falcon-RW is left out: TransformerLens follows transformers' eager ALiBi branch, which adds
# ALiBi twice, cloche the sdpa one the model runs; Falcon-40B-style models do not boot in TL 4.3)
FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma", "gemma2", "olmo2", "stablelm",
            "phi", "opt", "gpt_neo", "gptj", "gpt_neox", "phi3", "bloom", "falcon")
IDS = torch.tensor([[3, 17, 5, 44, 9, 81, 23], [60, 4, 4, 12, 99, 31, 7]])
TOL = 1e-5

# every family must accept at least these (per block: ``blocks.0.`` prepended)
REQUIRED_BLOCK = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "ln1.hook_scale", "ln1.hook_normalized", "ln1.hook_out", "ln2.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern",
    "attn.hook_z", "attn.hook_result", "mlp.hook_pre", "mlp.hook_post",
)
REQUIRED_GLOBAL = ("hook_embed", "ln_final.hook_normalized", "ln_final.hook_scale")
REQUIRED_EXTRA = {
    "gpt2": ("hook_pos_embed",),
    "llama": ("blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"),
    "qwen2": ("blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_rot_k"),
}
# TransformerLens 4.3 fires hook_attn_scores with the post-softmax pattern on the attention it
# does not reimplement (its plain AttentionBridge: OPT, GPT-J, GPT-Neo); cloche's attn.scores
# stay the scores. The test checks that this is still so, so that it notices when TL changes.
TL_SCORES_ARE_PATTERN = ("opt", "gptj", "gpt_neo")
WEIGHTS = ("attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O", "attn.b_O", "mlp.W_in", "mlp.W_out",
           "ln1.w", "ln2.w")


def _word(i: int) -> str:
    return f"w{i:03d}"


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """One token per id: TransformerLens wants a tokenizer, the tests feed it ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {_word(i): i for i in range(VOCAB)}  # fixed width: no token contains another
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=_word(2)))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=_word(0), eos_token=_word(1), pad_token=_word(2),
        unk_token=_word(2))


def _boot(family: str, directory, **processing):
    """TransformerLens' bridge on the model saved in ``directory`` (compatibility mode)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TransformerLens' own deprecation and setup warnings
        bridge = tl_bridge.TransformerBridge.boot_transformers(
            family, hf_model=hf, tokenizer=tokenizer, device="cpu")
        bridge.enable_compatibility_mode(**(processing or {"no_processing": True}))
    return bridge


CORE = tuple(REQUIRED_EXTRA)  # the families that must offer every alias
# every family here offers attn.scores (GPT-Neo's through cloche's copy of its attention)
NO_SCORES: tuple[str, ...] = ()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """``pairs(family)`` -> ``(family, cloche model, TransformerLens bridge)`` on the same saved
    weights, built once per family."""
    made: dict[str, tuple] = {}

    def get(family: str) -> tuple:
        if family not in made:
            directory = save_tiny(family, tmp_path_factory.mktemp(f"tl-{family}"))
            _word_tokenizer().save_pretrained(directory)
            bridge = _boot(family, directory)
            try:
                bridge.set_use_attn_result(True)
            except NotImplementedError:  # TL has no hook_result for this family's attention
                pass
            made[family] = (family, cloche.load(directory), bridge)
        return made[family]

    return get


@pytest.fixture(params=FAMILIES)
def pair(request, pairs):
    return pairs(request.param)


@pytest.fixture(params=CORE)
def core_pair(request, pairs):
    return pairs(request.param)


def _tl_cache(bridge) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, cache = bridge.run_with_cache(IDS)
    return dict(cache.items())


def _cloche_values(model, names: list[str]) -> dict[str, torch.Tensor]:
    got: dict[str, torch.Tensor] = {}

    def reader(name: str):
        return lambda ctx, x: got.__setitem__(name, x.detach().clone())

    model.run(IDS, probes={name: reader(name) for name in names})
    return got


def _accepted(model, names) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = model.resolve(name)
        except UnknownProbePoint:
            continue
    return out


def test_every_accepted_alias_gives_transformerlens_value(pair):
    family, model, bridge = pair
    cache = _tl_cache(bridge)
    accepted = _accepted(model, cache)
    if family in REQUIRED_EXTRA:
        required = [*(f"blocks.{i}.{s}" for i in range(model.n_layers) for s in REQUIRED_BLOCK),
                    *REQUIRED_GLOBAL, *REQUIRED_EXTRA[family]]
        assert [n for n in required if n not in accepted] == []
    got = _cloche_values(model, sorted(set(accepted.values())))
    wrong = {}
    for name, point in accepted.items():
        want, have = cache[name], got[point]
        if family in TL_SCORES_ARE_PATTERN and name.endswith("hook_attn_scores"):
            assert torch.equal(want, cache[name.replace("attn_scores", "pattern")])
            continue
        if name == "hook_pos_embed":  # the model's (1, seq, d_model): shared by the batch
            have = have.expand_as(want)
        if want.dim() == have.dim() - 1 and want.shape == have.flatten(0, 1).shape:
            # OPT runs its second norm on flattened tokens: TL shows (batch * seq, ...),
            # cloche (batch, seq, ...) like every point; the values are the same
            have = have.flatten(0, 1)
        if want.shape != have.shape:
            wrong[name] = f"shape {tuple(have.shape)} != TL {tuple(want.shape)}"
            continue
        finite = torch.isfinite(want)
        if not torch.equal(finite, torch.isfinite(have)) or not torch.equal(
                want[~finite], have[~finite]):
            wrong[name] = "the masked (infinite) entries differ"
        elif (want[finite] - have[finite]).abs().max() > TOL:
            wrong[name] = f"max diff {(want[finite] - have[finite]).abs().max():.2e}"
    assert wrong == {}


def test_scores_are_before_softmax_with_the_mask_applied(pair):
    family, model, _ = pair
    if not _accepted(model, ["layers.1.attn.scores"]):
        assert family in NO_SCORES, f"{family} lost attn.scores"
        return
    scores = _cloche_values(model, ["layers.1.attn.scores", "layers.1.attn.pattern"])
    s, p = scores["layers.1.attn.scores"], scores["layers.1.attn.pattern"]
    future = torch.ones(IDS.shape[1], IDS.shape[1], dtype=torch.bool).triu(1)
    if family == "gpt_neo":  # layer 1 is local: keys 4 or more tokens back are masked too
        future |= torch.ones_like(future).tril(-model.hf_model.config.window_size)
    assert torch.isneginf(s[..., future]).all() and torch.isfinite(s[..., ~future]).all()
    torch.testing.assert_close(s.softmax(-1), p)


REPLACED = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_k",
            "attn.hook_attn_scores", "attn.hook_result", "ln1.hook_normalized", "ln1.hook_scale",
            "ln2.hook_normalized", "attn.hook_z")


def _edit(x: torch.Tensor) -> torch.Tensor:
    """A deterministic edit that keeps -inf entries (masked scores) as they are."""
    return torch.where(torch.isfinite(x), x * 3.0 + 0.5, x)


def test_a_replacement_changes_the_output_as_in_transformerlens(pair):
    """Each hook both sides offer (every one TL has, on the core families), edited alike."""
    family, model, bridge = pair
    tl_names = _tl_cache(bridge)
    checked = []
    for hook in REPLACED:
        name = f"blocks.0.{hook}"
        if name not in tl_names or (family in TL_SCORES_ARE_PATTERN
                                    and hook == "attn.hook_attn_scores"):
            continue  # TL lacks it here, or fires the pattern under its name
        if not _accepted(model, [name]):
            assert family not in CORE, f"{family} must offer {name}"
            continue
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            want = bridge.run_with_hooks(IDS, fwd_hooks=[(name, lambda x, hook: _edit(x))])
            plain = bridge(IDS)
        got = model.run(IDS, probes={name: lambda ctx, x: _edit(x)}).logits
        if family not in CORE and (want - plain).abs().max() <= 1e-4:
            continue  # (BLOOM's keys barely move its ALiBi scores: nothing to compare)
        assert (want - plain).abs().max() > 1e-4, f"the edit of {name} must matter"
        torch.testing.assert_close(got, want, atol=TOL, rtol=0, msg=name)
        checked.append(hook)
    assert checked, f"no replaceable hook checked on {family}"


def test_transformerlens_weight_names_give_transformerlens_weights(pair):
    _, model, bridge = pair
    state = {}
    for i in range(model.n_layers):
        block = bridge.blocks[i]
        for name in WEIGHTS:
            part, attr = name.split(".")
            module = getattr(block, part, None)  # (a parallel block has no ln2)
            state[f"blocks.{i}.{name}"] = getattr(module, attr, None)
    state.update({"W_E": bridge.W_E, "W_U": bridge.W_U, "embed.W_E": bridge.W_E,
                  "unembed.W_U": bridge.W_U})
    checked = 0
    for name, want in state.items():
        if want is None:
            continue
        have = model.param(name)
        torch.testing.assert_close(have, want.detach(), atol=0, rtol=0, msg=name)
        checked += 1
    assert checked >= 2 + model.n_layers * 6


def test_a_missing_transformerlens_point_names_the_cause(tmp_path):
    """Helium has no adapter: discovery proves no projection sites, and the error says so."""
    config = transformers.HeliumConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=64, vocab_size=VOCAB)
    torch.manual_seed(0)
    transformers.HeliumForCausalLM(config).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no cloche adapter"):
        model = cloche.load(tmp_path)
    with pytest.raises(UnknownProbePoint, match=r"attn\.q_proj"):
        model.resolve("blocks.0.attn.hook_q")


GRADIENTS = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_k",
             "attn.hook_attn_scores", "attn.hook_result", "ln1.hook_normalized", "ln1.hook_scale")


def test_gradient_probes_see_transformerlens_gradients(core_pair):
    _, model, bridge = core_pair
    tl_names = _tl_cache(bridge)
    names = [f"blocks.0.{hook}" for hook in GRADIENTS if f"blocks.0.{hook}" in tl_names]
    assert len(names) >= 6, names
    for name in names:
        _same_gradient(model, bridge, name)


def _same_gradient(model, bridge, name: str) -> None:
    want: list[torch.Tensor] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TL warns that its norm hooks leave HF's fast path
        bridge.add_hook(name, lambda g, hook: want.append(g.detach().clone()), dir="bwd")
        try:
            bridge(IDS)[..., 5].sum().backward()
        finally:
            bridge.reset_hooks()
            bridge.zero_grad(set_to_none=True)
    got: list[torch.Tensor] = []
    model.run(IDS, grad_probes={name: lambda ctx, g: got.append(g.detach().clone())},
              backward=lambda out: out.logits[..., 5].sum())
    assert len(got) == len(want) == 1, name
    finite = torch.isfinite(want[0])
    torch.testing.assert_close(got[0][finite], want[0][finite], atol=TOL, rtol=1e-4, msg=name)


# --- the experiments researchers compare across tools give TransformerLens' numbers -------------

def test_logit_lens_matches_transformerlens(core_pair):
    from cloche.experiments import logit_lens

    _, model, bridge = core_pair
    ids = IDS[0]
    lens = logit_lens(model, ids, k=3)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, cache = bridge.run_with_cache(ids[None])
        # 0_pre, 1_pre, ..., final_post, each through the final norm recomputed on it
        stack = cache.accumulated_resid(apply_ln=True)[1:, 0]
        logits = stack @ bridge.W_U + bridge.b_U
    want = logits.log_softmax(-1)[:, :-1].gather(-1, ids[1:, None].expand(len(stack), -1, 1))
    torch.testing.assert_close(torch.as_tensor(lens.target_logprob), want[..., 0],
                               atol=TOL, rtol=0)


def test_activation_patching_grid_matches_transformerlens(core_pair):
    from cloche.experiments import logit_diff, patch_grid
    from transformer_lens import patching

    _, model, bridge = core_pair
    clean, corrupted = IDS[:1], IDS[1:]
    metric = logit_diff(5, 7)
    result = patch_grid(model, clean, corrupted, metric, kind="resid_pre", progress=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, clean_cache = bridge.run_with_cache(clean)
        want = patching.get_act_patch_resid_pre(
            bridge, corrupted, clean_cache, lambda logits: (logits[:, -1, 5] - logits[:, -1, 7]).mean())
    torch.testing.assert_close(torch.as_tensor(result.grid, dtype=torch.float32), want,
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("family", list(REQUIRED_EXTRA))
def test_head_logit_attribution_matches_transformerlens(family, tmp_path):
    from cloche.experiments import head_logit_attribution

    directory = save_tiny(family, tmp_path)
    _word_tokenizer().save_pretrained(directory)
    model = cloche.load(directory)
    # TransformerLens' direct logit attribution reads W_U with the final norm's weight folded in
    bridge = _boot(family, directory, fold_ln=True, center_writing_weights=False,
                   center_unembed=False, fold_value_biases=False)
    got = head_logit_attribution(model, IDS, [5, 9])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        _, cache = bridge.run_with_cache(IDS)
        stack = cache.stack_head_results(layer=-1, pos_slice=-1, apply_ln=True)  # (L*H, b, d)
        directions = bridge.W_U[:, torch.tensor([5, 9])].T  # (batch, d_model)
        want = torch.einsum("cbd,bd->cb", stack, directions).mean(-1)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float32),
                               want.reshape(model.n_layers, -1), atol=TOL, rtol=0)


# detect_head takes text, and TL's Qwen2 bridge turns this test tokenizer's text into BOS alone
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("exclude", [False, True])
def test_head_detector_matches_transformerlens(pairs, family, kind, exclude):
    from cloche.experiments import detect_heads
    from transformer_lens import head_detector

    _, model, bridge = pairs(family)
    gen = torch.Generator().manual_seed(1)
    halves = torch.randint(3, VOCAB, (2, 6), generator=gen)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), halves, halves], 1)  # BOS, r, r
    texts = [" ".join(_word(int(i)) for i in row[1:]) for row in ids]  # TL prepends the BOS
    got = detect_heads(model, ids, kind, exclude_bos=exclude, exclude_current_token=exclude)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for text, row in zip(texts, ids, strict=True):  # detect_head tokenizes each text alone
            assert torch.equal(bridge.to_tokens(text)[0], row)
        want = head_detector.detect_head(bridge, texts, kind, exclude_bos=exclude,
                                         exclude_current_token=exclude)
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(torch.as_tensor(got, dtype=want.dtype), want, atol=TOL, rtol=0)



@pytest.mark.parametrize("kind", ["previous_token_head", "duplicate_token_head", "induction_head"])
@pytest.mark.parametrize("exclude", [False, True])
def test_head_detector_matches_transformerlens_on_grouped_query_qwen2(pairs, kind, exclude):
    """Head detector scores on Qwen2 (grouped-query attention) are TransformerLens' own:
    its detection pattern and its similarity score on the patterns its bridge caches, averaged
    over the sequences as its ``detect_head`` averages a list of texts.

    (``detect_head`` itself takes text, and TransformerLens rebuilds a Qwen2 bridge's tokenizer
    as Qwen2's byte-level BPE, which reads this test's words as nothing: the ids go in directly,
    and what ``detect_head`` does after tokenizing is done here with its own functions.)
    """
    from cloche.experiments import detect_heads
    from transformer_lens import head_detector

    _, model, bridge = pairs("qwen2")
    gen = torch.Generator().manual_seed(1)
    halves = torch.randint(3, VOCAB, (2, 6), generator=gen)
    ids = torch.cat([torch.zeros(2, 1, dtype=torch.long), halves, halves], 1)  # BOS, r, r
    got = detect_heads(model, ids, kind, exclude_bos=exclude, exclude_current_token=exclude)
    detection = getattr(head_detector, f"get_{kind}_detection_pattern")
    per_sequence = []
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for row in ids:
            _, cache = bridge.run_with_cache(row[None], remove_batch_dim=True)
            pattern = detection(row[None].cpu())
            per_sequence.append(torch.tensor([[
                head_detector.compute_head_attention_similarity_score(
                    cache["pattern", layer, "attn"][head], detection_pattern=pattern,
                    exclude_bos=exclude, exclude_current_token=exclude, error_measure="mul")
                for head in range(bridge.cfg.n_heads)] for layer in range(bridge.cfg.n_layers)]))
    want = torch.stack(per_sequence).mean(0)
    assert bridge.cfg.n_key_value_heads < bridge.cfg.n_heads  # grouped-query attention
    assert want.abs().max() > 1e-3
    torch.testing.assert_close(torch.as_tensor(got, dtype=want.dtype), want, atol=TOL, rtol=0)
