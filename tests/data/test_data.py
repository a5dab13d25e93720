"""cloche.data: stable ids, deterministic order, padding, and the file/JSONL/directory sources.

Uses a small byte-level BPE tokenizer trained here (no hub, no shipped weights needed).
"""

from __future__ import annotations

import json

import pytest
import torch
from cloche import data
from cloche.data import Batch, Dataset
from cloche.default_model import tokenizer as tok_mod
from cloche.errors import UsageError

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    x: int\n    y: int\n",
    "import os\nprint(os.getcwd())\n",
    "for i in range(10):\n    print(i * i)\n" * 3,
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = tok_mod.train_tokenizer(TEXTS * 5, vocab_size=300)
    directory = tmp_path_factory.mktemp("tok")
    tok_mod.save(tok, directory)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def test_tokenizer_special_ids(tokenizer):
    assert tokenizer.eos_token_id == 0
    assert tokenizer.bos_token_id == 0
    assert tokenizer.pad_token_id == 1
    assert tokenizer.decode(tokenizer(TEXTS[0])["input_ids"]) == TEXTS[0]


def test_from_texts_one_example_per_text_with_stable_ids(tokenizer):
    ds = data.from_texts(TEXTS, tokenizer, seq_len=16)
    assert len(ds) == len(TEXTS)
    for i, text in enumerate(TEXTS):
        expected = tokenizer(text)["input_ids"][:16]
        assert ds[i].tolist() == expected
        assert ds[i].dtype == torch.long
    assert ds.name.startswith("texts:")
    assert data.from_texts(TEXTS, tokenizer, seq_len=16, name="mine").name == "mine"


def test_batches_pad_right_and_mask(tokenizer):
    ds = data.from_texts(TEXTS, tokenizer, seq_len=64)
    batches = list(ds.batches(3))
    assert [b.example_ids.tolist() for b in batches] == [[0, 1, 2], [3]]
    first = batches[0]
    assert isinstance(first, Batch)
    width = max(len(ds[i]) for i in range(3))
    assert first.tokens.shape == first.attention_mask.shape == (3, width)
    for row, i in enumerate(first.example_ids.tolist()):
        n = len(ds[i])
        assert first.tokens[row, :n].tolist() == ds[i].tolist()
        assert first.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
        assert (first.tokens[row, n:] == tokenizer.pad_token_id).all()


def test_batches_start_and_limit(tokenizer):
    ds = data.from_texts(TEXTS, tokenizer, seq_len=64)
    ids = [i for b in ds.batches(2, start=1, limit=2) for i in b.example_ids.tolist()]
    assert ids == [1, 2]
    assert list(ds.batches(2, start=len(ds))) == []
    with pytest.raises(UsageError):
        next(ds.batches(0))
    with pytest.raises(UsageError):
        next(ds.batches(2, start=len(ds) + 1))


def test_getitem_out_of_range_is_usage_error(tokenizer):
    ds = data.from_texts(TEXTS, tokenizer)
    with pytest.raises(UsageError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(UsageError):
        ds[-1]


def test_fingerprint_is_deterministic_and_content_sensitive(tokenizer):
    a = data.from_texts(TEXTS, tokenizer, seq_len=32)
    b = data.from_texts(list(TEXTS), tokenizer, seq_len=32, name="other name")
    c = data.from_texts([*TEXTS[:-1], "x = 1\n"], tokenizer, seq_len=32)
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
    # Same tokens, split differently into examples, is different data.
    flat = [t for i in range(len(a)) for t in a[i].tolist()]
    d = Dataset([flat[:5], flat[5:]], name="d", seq_len=len(flat), pad_id=1)
    e = Dataset([flat[:6], flat[6:]], name="e", seq_len=len(flat), pad_id=1)
    assert d.fingerprint() != e.fingerprint()


def _expected_chunks(tokenizer, docs, seq_len):
    stream = []
    for doc in docs:
        stream += [tokenizer.eos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"]
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def test_from_path_text_file_chunks_to_seq_len(tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("".join(TEXTS), encoding="utf-8")
    ds = data.from_path(path, tokenizer, seq_len=8)
    expected = _expected_chunks(tokenizer, ["".join(TEXTS)], 8)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    assert all(len(ds[i]) == 8 for i in range(len(ds) - 1))
    assert ds.name == str(path)


def test_from_path_directory_is_sorted_and_recursive(tokenizer, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text(TEXTS[1], encoding="utf-8")
    (tmp_path / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (tmp_path / "sub" / "c.txt").write_text(TEXTS[2], encoding="utf-8")
    (tmp_path / ".hidden").write_text("ignored", encoding="utf-8")
    ds = data.from_path(tmp_path, tokenizer, seq_len=8)
    expected = _expected_chunks(tokenizer, TEXTS[:3], 8)
    assert [ds[i].tolist() for i in range(len(ds))] == expected


def test_from_path_jsonl_field(tokenizer, tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [json.dumps({"body": t, "n": i}) for i, t in enumerate(TEXTS)]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    ds = data.from_path(path, tokenizer, seq_len=8, field="body")
    expected = _expected_chunks(tokenizer, TEXTS, 8)
    assert [ds[i].tolist() for i in range(len(ds))] == expected
    with pytest.raises(UsageError, match="no string field 'text'"):
        data.from_path(path, tokenizer)


def test_get_routes_paths_and_rejects_unknown(tokenizer, tmp_path):
    path = tmp_path / "one.txt"
    path.write_text(TEXTS[0], encoding="utf-8")
    assert (
        data.get(str(path), tokenizer, seq_len=8).fingerprint()
        == data.from_path(path, tokenizer, seq_len=8).fingerprint()
    )
    with pytest.raises(UsageError, match="no such file"):
        data.get(str(tmp_path / "missing.txt"), tokenizer)
    with pytest.raises(UsageError, match="split"):
        data.get("default:nope", tokenizer)


def test_empty_example_is_rejected(tokenizer):
    with pytest.raises(UsageError, match="example 1"):
        data.from_texts(["a", ""], tokenizer)
