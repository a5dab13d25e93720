"""Build :class:`~cloche.data.dataset.Dataset` objects from texts, files and the default corpus.

Everything but :func:`from_texts` streams: documents are read and tokenized in pieces into the
tokenization cache (``cloche.data.cache``), and the dataset reads its examples from there (or
from the user's token file) one batch at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloche.data.cache import tokenized
from cloche.data.dataset import Dataset
from cloche.data.stamps import remembered, stamp_of
from cloche.data.tokens import open_npy, open_raw
from cloche.errors import Cancelled, UsageError

__all__ = ["chunk_documents", "default", "from_path", "from_texts", "from_tokens", "get"]

DEFAULT_PREFIX = "default:"
_SPLITS = ("heldout", "train")
_source_keys: dict[str, str] = {}
_keys_lock = threading.Lock()
_shipped_tokenizer: Any = None
_HASH_PIECE = 1 << 22


def _tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object; ``None`` means the default model's, a path is loaded from disk."""
    global _shipped_tokenizer
    if tokenizer is None:
        if _shipped_tokenizer is None:
            from cloche.default_model import weights_dir

            _shipped_tokenizer = _load_tokenizer(weights_dir())
        return _shipped_tokenizer
    if isinstance(tokenizer, (str, Path)):
        return _load_tokenizer(Path(tokenizer))
    return tokenizer


def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot load a tokenizer from {str(path)!r}: {exc}") from exc


def _pad_id(tok: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    return 0


def _encode(tok: Any, texts: list[str], *, special: bool) -> list[list[int]]:
    if not texts:
        return []
    # verbose=False: documents longer than model_max_length are expected here (they are
    # chunked afterwards), so the tokenizer's "sequence too long" message would only mislead.
    return list(tok(texts, add_special_tokens=special, verbose=False)["input_ids"])


def chunk_documents(docs: Iterable[Sequence[int]], eos_id: int, seq_len: int) -> list[np.ndarray]:
    """Join documents into one stream, each preceded by ``eos_id``, cut into ``seq_len`` rows.

    Only the last row may be shorter than ``seq_len``.
    """
    parts = [np.asarray([eos_id, *doc], dtype=np.int64) for doc in docs]
    if not parts:
        return []
    stream = np.concatenate(parts)
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


def from_texts(
    texts: Sequence[str], tokenizer: Any, *, seq_len: int = 128, name: str | None = None
) -> Dataset:
    """One example per text (tokenized as the tokenizer does by default), cut to ``seq_len``."""
    if isinstance(texts, str):
        raise UsageError("from_texts takes a sequence of texts, not one string")
    tok = _tokenizer(tokenizer)
    ids = [row[:seq_len] for row in _encode(tok, list(texts), special=True)]
    ds = Dataset(ids, name=name or "texts", seq_len=seq_len, pad_id=_pad_id(tok))
    if name is None:
        ds.name = f"texts:{ds.fingerprint()[:12]}"
    return ds


def _check(cancel: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("the dataset run was cancelled (while reading its documents)")


def _files_of(path: Path) -> list[Path]:
    """A directory's files (recursive, sorted by relative path, hidden ones left out)."""
    return sorted(
        (p for p in path.rglob("*") if p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(path).parts)),
        key=lambda p: p.relative_to(path).as_posix(),
    )


def _content_key(path: Path, files: list[Path], cancel: Any) -> str:
    """sha256 over the files' relative names and bytes (remembered while their stamps hold)."""
    return remembered("files", stamp_of(files) + str(path.resolve()),
                      lambda: _hash_files(path, files, cancel))


def _hash_files(path: Path, files: list[Path], cancel: Any) -> str:
    h = hashlib.sha256()
    for file in files:
        _check(cancel)
        rel = file.name if file == path else file.relative_to(path).as_posix()
        h.update(rel.encode() + b"\0")
        try:
            with open(file, "rb") as f:
                while piece := f.read(_HASH_PIECE):
                    h.update(piece)
        except OSError as exc:
            raise UsageError(f"cannot read {str(file)!r}: {exc}") from exc
        h.update(b"\0")
    return h.hexdigest()


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{str(path)!r} line {n} is not JSON: {exc}") from exc
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise UsageError(f"{str(path)!r} line {n} has no string field {field!r}")
                yield record[field]
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {str(path)!r} as UTF-8 text: {exc}") from exc


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {str(path)!r} as UTF-8 text: {exc}") from exc


def _eos_id(tok: Any) -> int:
    value = getattr(tok, "eos_token_id", None)
    if value is None:
        raise UsageError("the tokenizer has no eos token to separate documents with")
    return int(value)


def _stream_dataset(source_key: str, docs: Any, tok: Any, *, seq_len: int, name: str,
                    cancel: Any) -> Dataset:
    """Documents joined (each after an eos) into one cached stream, cut into seq_len pieces."""
    tokens, _ = tokenized(source_key, docs, tok, eos_id=_eos_id(tok), cancel=cancel)
    return Dataset.from_tokens(tokens, name=name, seq_len=seq_len, pad_id=_pad_id(tok))


def from_path(
    path: str | Path, tokenizer: Any = None, *, seq_len: int = 128, field: str = "text",
    cancel: Any = None,
) -> Dataset:
    """A text file, a directory of text files (sorted by relative path), or ``.jsonl``.

    ``tokenizer`` defaults to the default model's. Documents are joined into one stream, each
    preceded by the eos token, and cut into ``seq_len`` examples (only the last may be
    shorter). The stream is tokenized once per content and tokenizer and cached on disk.
    """
    path = Path(path)
    if not path.exists():
        raise UsageError(f"no such file or directory: {str(path)!r}")
    tok = _tokenizer(tokenizer)
    files = _files_of(path) if path.is_dir() else [path]
    jsonl = not path.is_dir() and path.suffix == ".jsonl"
    key = f"path|{'jsonl:' + field if jsonl else 'text'}|{_content_key(path, files, cancel)}"

    def docs() -> Iterator[str]:
        if jsonl:
            yield from _jsonl_documents(path, field)
        else:
            for file in files:
                yield _read_text(file)

    return _stream_dataset(key, docs, tok, seq_len=seq_len, name=str(path), cancel=cancel)


def from_tokens(path: str | Path, *, seq_len: int = 128, dtype: str | None = None,
                pad_id: int = 0, name: str | None = None) -> Dataset:
    """Token ids already on disk: ``.npy`` or a raw ``.bin`` (``dtype``, default ``uint16``).

    A 1-D array is one stream cut into ``seq_len`` examples (nanoGPT's ``train.bin``); a 2-D
    ``(rows, width)`` array has one example per row (cut to ``seq_len``). Read a batch at a
    time; the file is never loaded whole.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no such token file: {str(path)!r}")
    if path.suffix == ".npy":
        if dtype is not None:
            raise UsageError(".npy files carry their dtype: leave dtype unset")
        tokens, width = open_npy(path)
    else:
        tokens, width = open_raw(path, dtype or "uint16"), None
    return Dataset.from_tokens(tokens, name=name or str(path), seq_len=seq_len, pad_id=pad_id,
                               stride=width)


def _corpus_stamp(split: str) -> str:
    """The stamps of the files the default corpus is read from (cheap: no file is read)."""
    from cloche.default_model import corpus

    if split == "heldout":
        return stamp_of([corpus.data_dir() / "heldout.jsonl.xz"])
    root = corpus.stdlib_root()
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        found += [Path(folder) / n for n in sorted(names) if n.endswith(".py")]
    return stamp_of(found) + str(root)


def _default_key(split: str, files: Any, cancel: Any) -> str:
    with _keys_lock:
        if split in _source_keys:
            return _source_keys[split]
    def compute() -> str:
        h = hashlib.sha256(f"default|{split}".encode())
        for f in files():
            _check(cancel)
            h.update(f.path.encode() + b"\0" + f.text.encode() + b"\0")
        return h.hexdigest()

    key = remembered(f"default:{split}", _corpus_stamp(split), compute)
    with _keys_lock:
        _source_keys[split] = key
    return key


def default(split: str = "heldout", *, tokenizer: Any = None, seq_len: int = 128,
            cancel: Any = None) -> Dataset:
    """The default corpus: ``"heldout"`` (shipped) or ``"train"`` (this machine's stdlib).

    Tokenized once per content and tokenizer into the on-disk cache, whoever passes the
    tokenizer; later calls (in any process) read the cached stream.
    """
    from cloche.default_model import corpus

    if split not in _SPLITS:
        raise UsageError(f"split ({split!r}) must be one of {', '.join(_SPLITS)}")
    files = corpus.heldout_files if split == "heldout" else corpus.train_files
    key = _default_key(split, files, cancel)

    def docs() -> Iterator[str]:
        for f in files():
            yield f.text

    return _stream_dataset(key, docs, _tokenizer(tokenizer), seq_len=seq_len,
                           name=DEFAULT_PREFIX + split, cancel=cancel)


def get(name: str, tokenizer: Any = None, seq_len: int = 128, *, cancel: Any = None
        ) -> Dataset:
    """A dataset by name (``cloche.data.names`` describes them all)."""
    from cloche.data.names import resolve

    return resolve(name, tokenizer, seq_len, cancel=cancel)


def tokenizer_for(tokenizer: Any) -> Any:
    """The tokenizer object ``tokenizer`` means (``None``: the default model's)."""
    return _tokenizer(tokenizer)


def pad_id_of(tok: Any) -> int:
    return _pad_id(tok)
