"""How text becomes tokens is stated and settable: BOS or not, padding side, chat template.

These conventions change results silently when they differ from another tool's (TransformerLens
prepends a BOS token by default; the shipped model's tokenizer does not), so the model says
what it does and takes an explicit choice.
"""

from __future__ import annotations

import cloche
import pytest
import torch

TEXTS = ["def add(a, b):", "import os"]


@pytest.fixture
def model():
    return cloche.load()  # a fresh facade: the tests change its conventions


def test_by_default_text_is_tokenized_as_the_tokenizer_does(model):
    assert model.prepend_bos is None and model.padding_side == "right"
    want = model.tokenizer(TEXTS[0])["input_ids"]
    assert model.tokenize(TEXTS[0]).tolist() == want
    assert want[0] != model.tokenizer.bos_token_id  # this tokenizer adds no BOS by itself


def test_prepend_bos_and_padding_side_are_explicit(model):
    bos, pad = model.tokenizer.bos_token_id, model.tokenizer.pad_token_id
    plain = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    model.prepend_bos = True
    ids = model.tokenize(TEXTS)
    assert ids[:, 0].tolist() == [bos, bos]
    width = max(len(r) for r in plain) + 1
    assert ids.shape == (2, width)
    short = min(range(2), key=lambda i: len(plain[i]))
    assert ids[short, -1] == pad  # right padding by default
    model.padding_side = "left"
    left = model.tokenize(TEXTS)
    assert left[short, 0] == pad and left[short, -len(plain[short]) - 1] == bos
    model.prepend_bos, model.padding_side = False, "right"
    assert model.tokenize(TEXTS[0]).tolist() == plain[0]


def test_run_uses_the_conventions_and_equals_the_same_ids(model):
    model.prepend_bos = True
    with_bos = model.run(TEXTS[0])
    ids = torch.tensor([[model.tokenizer.bos_token_id,
                         *model.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]]])
    assert torch.equal(with_bos.logits, model.run(ids).logits)
    model.prepend_bos = None
    assert with_bos.logits.shape[1] == model.run(TEXTS[0]).logits.shape[1] + 1
    model.padding_side = "middle"
    with pytest.raises(cloche.UsageError, match="padding_side"):
        model.run(TEXTS)


def test_chat_template(model):
    with pytest.raises(cloche.UsageError, match="no chat template"):
        model.apply_chat_template([{"role": "user", "content": "hi"}])
    model.tokenizer.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        text = model.apply_chat_template([{"role": "user", "content": "def f():"}])
        assert text == "<user>def f():\n<assistant>"
        assert model.generate(text, 3).text.startswith(text)
    finally:
        model.tokenizer.chat_template = None
