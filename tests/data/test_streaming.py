"""Streaming sources: token files, names with options, Hugging Face datasets, and the on-disk
tokenization cache (keyed by content and tokenizer, cancellable)."""

from __future__ import annotations

import json
import pickle
import threading

import numpy as np
import pytest
import torch
from cloche import data
from cloche.data import cache
from cloche.errors import Cancelled, UsageError
from transformers import AutoTokenizer

from tests.data.test_data import TEXTS, tokenizer  # noqa: F401 - the fixture


def rows_of(ds):
    return [ds[i].tolist() for i in range(len(ds))]


def test_npy_stream_is_cut_into_seq_len_examples(tmp_path):
    ids = np.arange(1, 101, dtype=np.uint16)
    np.save(tmp_path / "t.npy", ids)
    ds = data.get(f"{tmp_path / 't.npy'}?seq_len=32")
    assert len(ds) == 4 and ds.num_tokens == 100 and ds.seq_len == 32
    assert ds[3].tolist() == list(range(97, 101))
    batch = next(ds.batches(3, start=2))
    assert batch.example_ids.tolist() == [2, 3]
    assert batch.attention_mask.sum(1).tolist() == [32, 4]
    assert batch.tokens[1, 4:].eq(ds.pad_id).all()
    again = pickle.loads(pickle.dumps(ds))  # pickles as the path: a server reopens the file
    assert len(pickle.dumps(ds)) < 1000 and rows_of(again) == rows_of(ds)
    assert again.fingerprint() == ds.fingerprint() == data.get(
        f"{tmp_path / 't.npy'}?seq_len=32").fingerprint()
    # one definition of the fingerprint, wherever the ids live (the model card's is in memory)
    in_memory = data.Dataset([ids[i:i + 32] for i in range(0, 100, 32)], name="m", seq_len=32,
                             pad_id=ds.pad_id)
    assert in_memory.fingerprint() == ds.fingerprint()


def test_npy_rows_and_raw_bin(tmp_path):
    rows = np.arange(60, dtype=np.int32).reshape(6, 10)
    np.save(tmp_path / "rows.npy", rows)
    ds = data.from_tokens(tmp_path / "rows.npy", seq_len=8)  # one example per row, cut to 8
    assert rows_of(ds) == [r[:8].tolist() for r in rows]
    big = np.array([70000, 1, 2, 3, 4], dtype=np.uint32)
    big.tofile(tmp_path / "train.bin")
    assert data.get(f"{tmp_path / 'train.bin'}?dtype=uint32&seq_len=2")[0].tolist() == [70000, 1]
    assert data.get(f"{tmp_path / 'train.bin'}?seq_len=4")[0].numel() == 4  # read as uint16
    np.zeros(3, dtype=np.uint8).tofile(tmp_path / "odd.bin")
    with pytest.raises(UsageError, match="whole number"):
        data.get(str(tmp_path / "odd.bin"))
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(UsageError, match="float32"):
        data.get(str(tmp_path / "f.npy"))


def test_names_with_options_are_checked(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(10, dtype=np.uint16))
    with pytest.raises(UsageError, match="unknown options"):
        data.get(f"{tmp_path / 't.npy'}?seqlen=4")
    with pytest.raises(UsageError, match="seq_len"):
        data.get(f"{tmp_path / 't.npy'}?seq_len=0")
    with pytest.raises(UsageError, match="do not apply"):
        data.get("default:heldout?dtype=uint16")
    with pytest.raises(UsageError, match="no such token file"):
        data.get(str(tmp_path / "missing.npy"))


def test_tokenization_is_cached_by_content_and_tokenizer(tokenizer, tmp_path,  # noqa: F811
                                                         monkeypatch):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    first = data.from_path(path, tokenizer, seq_len=8)
    built = []
    real_build = cache._build
    monkeypatch.setattr(cache, "_build", lambda *a, **k: built.append(a) or real_build(*a, **k))
    cache._opened.clear()  # as in a new process: only the files on disk are left
    same_tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)  # another object, same files
    again = data.get(f"{path}?seq_len=8", same_tok)
    assert built == [] and rows_of(again) == rows_of(first)
    assert again.fingerprint() == first.fingerprint()
    path.write_text(path.read_text() + json.dumps({"text": "x = 1"}) + "\n")  # new content
    changed = data.from_path(path, tokenizer, seq_len=8)
    assert len(built) == 1 and changed.fingerprint() != first.fingerprint()


def test_a_cancel_stops_tokenizing_and_keeps_nothing(tokenizer, token_cache):  # noqa: F811
    cancel = threading.Event()

    def docs():
        for i in range(10 * cache.PIECE_DOCS):
            if i == 3 * cache.PIECE_DOCS:
                cancel.set()  # as a client's cancel would, while tokenizing
            yield TEXTS[i % len(TEXTS)]

    with pytest.raises(Cancelled, match="tokenizing"):
        cache.tokenized("test-docs", docs, tokenizer, eos_id=tokenizer.eos_token_id,
                        cancel=cancel)
    assert list(token_cache.iterdir()) == []  # no partial stream, no record
    tokens, _ = cache.tokenized("test-docs", docs, tokenizer, eos_id=tokenizer.eos_token_id)
    assert len(tokens) > 0


def test_a_long_document_is_tokenized_in_pieces(monkeypatch):
    monkeypatch.setattr(cache, "PIECE_CHARS", 64)
    pieces = list(cache._pieces("line one\n" * 20))
    assert "".join(pieces) == "line one\n" * 20 and all(p.endswith("\n") for p in pieces)
    assert all(len(p) <= 64 for p in pieces)


def test_hf_text_column_streams_like_the_same_jsonl(tokenizer, tmp_path):  # noqa: F811
    import datasets

    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(
        str(tmp_path / "saved"))
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    want = rows_of(data.from_path(jsonl, tokenizer, seq_len=8))
    from_disk = data.get(f"hf:{tmp_path / 'saved'}?seq_len=8", tokenizer)
    from_file = data.get(f"hf:{jsonl}?seq_len=8", tokenizer)  # a local file, through datasets
    assert rows_of(from_disk) == rows_of(from_file) == want
    with pytest.raises(UsageError, match="columns"):
        data.get(f"hf:{tmp_path / 'saved'}?field=body", tokenizer)
    with pytest.raises(UsageError, match="lists of token ids"):
        data.get(f"hf:{tmp_path / 'saved'}?field=n", tokenizer)


def test_hf_token_column_gives_one_example_per_row(tmp_path):
    import datasets

    rows = [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10]]
    datasets.Dataset.from_dict({"input_ids": rows}).to_parquet(str(tmp_path / "t.parquet"))
    ds = data.get(f"hf:{tmp_path / 't.parquet'}?field=input_ids&seq_len=4")
    assert rows_of(ds) == [[1, 2, 3, 4], [6, 7], [8, 9, 10]]
    batch = next(ds.batches(8))
    assert batch.attention_mask.sum(1).tolist() == [4, 2, 3]
    assert torch.equal(batch.example_ids, torch.arange(3))


def test_default_corpus_with_a_tokenizer_is_cached(monkeypatch):
    first = data.default("heldout")
    monkeypatch.setattr(cache, "_build", lambda *a, **k: pytest.fail("tokenized again"))
    cache._opened.clear()
    from cloche.data import sources

    tok = AutoTokenizer.from_pretrained(sources.tokenizer_for(None).name_or_path)
    again = data.get("default:heldout", tok)  # the server passes its own tokenizer object
    assert again.fingerprint() == first.fingerprint() and len(again) == len(first)
