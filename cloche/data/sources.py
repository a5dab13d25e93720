"""Build :class:`~cloche.data.dataset.Dataset` objects from texts, files and the default corpus."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cloche.data.dataset import Dataset
from cloche.errors import UsageError

__all__ = ["chunk_documents", "default", "from_path", "from_texts", "get"]

DEFAULT_PREFIX = "default:"
_SPLITS = ("heldout", "train")
_cache: dict[tuple[str, int], Dataset] = {}
_cache_lock = threading.Lock()
_shipped_tokenizer: Any = None


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


def _read_documents(path: Path, field: str) -> list[str]:
    if not path.exists():
        raise UsageError(f"no such file or directory: {str(path)!r}")
    if path.is_dir():
        files = sorted(
            (
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
            ),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        return [_read_text(p) for p in files]
    if path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{str(path)!r} line {n} is not JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise UsageError(f"{str(path)!r} line {n} has no string field {field!r}")
            docs.append(record[field])
        return docs
    return [_read_text(path)]


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


def _from_documents(docs: list[str], tok: Any, *, seq_len: int, name: str) -> Dataset:
    rows = chunk_documents(_encode(tok, docs, special=False), _eos_id(tok), seq_len)
    return Dataset(rows, name=name, seq_len=seq_len, pad_id=_pad_id(tok))


def from_path(
    path: str | Path, tokenizer: Any = None, *, seq_len: int = 128, field: str = "text"
) -> Dataset:
    """A text file, a directory of text files (sorted by relative path), or ``.jsonl``.

    ``tokenizer`` defaults to the default model's.
    """
    path = Path(path)
    tok = _tokenizer(tokenizer)
    return _from_documents(_read_documents(path, field), tok, seq_len=seq_len, name=str(path))


def default(split: str = "heldout", *, tokenizer: Any = None, seq_len: int = 128) -> Dataset:
    """The default corpus: ``"heldout"`` (shipped) or ``"train"`` (this machine's stdlib).

    With the shipped tokenizer the result is cached per process, so repeated calls are free.
    """
    from cloche.default_model import corpus

    if split not in _SPLITS:
        raise UsageError(f"split ({split!r}) must be one of {', '.join(_SPLITS)}")
    key = (split, seq_len)
    if tokenizer is None:
        with _cache_lock:
            if key in _cache:
                return _cache[key]
    files = corpus.heldout_files() if split == "heldout" else corpus.train_files()
    ds = _from_documents(
        [f.text for f in files], _tokenizer(tokenizer), seq_len=seq_len, name=DEFAULT_PREFIX + split
    )
    if tokenizer is None:
        with _cache_lock:
            _cache.setdefault(key, ds)
    return ds


def get(name: str, tokenizer: Any = None, seq_len: int = 128) -> Dataset:
    """A dataset by name: ``"default:heldout"``, ``"default:train"``, or a filesystem path."""
    if name.startswith(DEFAULT_PREFIX):
        return default(name[len(DEFAULT_PREFIX) :], tokenizer=tokenizer, seq_len=seq_len)
    return from_path(name, tokenizer, seq_len=seq_len)
