"""Tokenization done once per content: a token stream on disk, named by what made it.

Tokenizing a corpus of text takes seconds to hours; its result depends only on the documents'
content, the tokenizer and how documents are joined. :func:`tokenized` names the result by a
hash of those three (never by a file's path or date) and keeps it under the cache folder as a
raw token file plus a small JSON record (written last, so a record means a complete file). The
next run — in this process, after a server restart, or in another process — reads the file.

Tokenizing streams documents in pieces and checks the run's cancel event between pieces, so a
cancelled run stops within one piece; nothing partial is ever taken for a result (the temporary
file is removed). The cache folder is ``~/.cache/cloche/datasets`` unless :func:`set_cache_dir`
chose another (a server's ``--state-dir`` is a good choice: the cache then lives with it).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cloche.data.tokens import TokenFile
from cloche.errors import Cancelled, UsageError

__all__ = ["cache_dir", "set_cache_dir", "tokenized", "tokenizer_identity"]

#: bump when the stream format or the joining of documents changes
FORMAT = "cloche.tokens/1"
#: documents (or rows) encoded per call of the tokenizer: the cancellation granularity
PIECE_DOCS = 64
#: longer documents are encoded in pieces cut after a newline (bounded memory per call)
PIECE_CHARS = 1 << 20

_dir: Path | None = None
_lock = threading.Lock()
_identities: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
_opened: dict[str, tuple[TokenFile, TokenFile | None]] = {}


def set_cache_dir(path: str | os.PathLike[str] | None) -> None:
    """Keep tokenized datasets under ``path`` (None: back to ``~/.cache/cloche/datasets``)."""
    global _dir
    _dir = None if path is None else Path(path).expanduser()


def cache_dir() -> Path:
    return _dir if _dir is not None else Path("~/.cache/cloche/datasets").expanduser()


def tokenizer_identity(tok: Any) -> str:
    """sha256 over the files ``save_pretrained`` writes: equal tokenizers, equal identities."""
    try:
        known = _identities.get(tok)
    except TypeError:  # not weak-referenceable
        known = None
    if known is not None:
        return known
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as directory:
        tok.save_pretrained(directory)
        for path in sorted(Path(directory).iterdir()):
            h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    digest = h.hexdigest()
    try:
        _identities[tok] = digest
    except TypeError:
        pass
    return digest


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of about PIECE_CHARS, each ending after a newline where possible."""
    start = 0
    while len(text) - start > PIECE_CHARS:
        cut = text.rfind("\n", start, start + PIECE_CHARS)
        cut = start + PIECE_CHARS if cut <= start else cut + 1
        yield text[start:cut]
        start = cut
    yield text[start:]


def _encode(tok: Any, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are expected here (they are cut into examples afterwards)
    return list(tok(texts, add_special_tokens=False, verbose=False)["input_ids"])


def _stream_documents(tok: Any, docs: Iterable[str], eos_id: int, write: Callable[[Any], None],
                      check: Callable[[], None]) -> None:
    """Each document as ``[eos, *ids]`` (a long one encoded in pieces), PIECE_DOCS at a time."""
    batch: list[str] = []
    heads: list[bool] = []  # whether the piece starts a document (gets the eos before it)

    def flush() -> None:
        check()
        for head, ids in zip(heads, _encode(tok, batch), strict=True):
            write([eos_id, *ids] if head else ids)
        batch.clear()
        heads.clear()

    for doc in docs:
        for k, piece in enumerate(_pieces(doc)):
            batch.append(piece)
            heads.append(k == 0)
            if len(batch) >= PIECE_DOCS:
                flush()
    if batch:
        flush()


def tokenized(source_key: str, docs: Callable[[], Iterable[Any]], tok: Any, *,
              rows: bool = False, eos_id: int | None = None, cancel: Any = None
              ) -> tuple[TokenFile, TokenFile | None]:
    """The token stream of ``docs()`` (``source_key`` names their content), cached on disk.

    Text documents are joined as ``[eos, *doc, eos, *doc, ...]``; returns ``(tokens, None)``.
    ``rows=True``: ``docs()`` yields token-id rows (already tokenized, ``tok`` may be None);
    returns ``(tokens, offsets)``, the rows end to end and their ``n + 1`` offsets.
    """
    tok_id = "rows" if rows else tokenizer_identity(tok)
    key = hashlib.sha256(f"{FORMAT}|{source_key}|{tok_id}".encode()).hexdigest()
    with _lock:
        if key in _opened:
            return _opened[key]
    folder = cache_dir()
    record = folder / f"{key}.json"
    if not record.exists():
        _build(folder, key, docs, tok, rows=rows, eos_id=eos_id, cancel=cancel)
    try:
        meta = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"the tokenization cache entry {record} is unreadable: {exc}") from exc
    tokens = TokenFile(str(folder / f"{key}.tokens"), meta["dtype"], meta["count"],
                       content=key)
    offsets = (TokenFile(str(folder / f"{key}.offsets"), "int64", meta["rows"] + 1,
                         content=key + ":offsets") if rows else None)
    with _lock:
        _opened[key] = (tokens, offsets)
    return tokens, offsets


def _build(folder: Path, key: str, docs: Callable[[], Iterable[Any]], tok: Any, *, rows: bool,
           eos_id: int | None, cancel: Any) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the tokenization cache folder {folder}: {exc}") from exc
    vocab = len(tok) if tok is not None and not rows else None
    dtype = np.dtype("<u2") if vocab is not None and vocab <= 1 << 16 else np.dtype("<u4")
    tmp_tokens = folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tokens.tmp"
    tmp_offsets = tmp_tokens.with_suffix(".offsets.tmp")
    count, n_rows = 0, 0
    offsets_file = open(tmp_offsets, "wb") if rows else None  # noqa: SIM115 - closed below

    def check() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled("the dataset run was cancelled (while tokenizing; nothing was kept)")

    try:
        with open(tmp_tokens, "wb") as out:
            def write(ids: Any) -> None:
                nonlocal count
                array = np.asarray(ids, dtype=np.int64)
                if array.size and (array.min() < 0 or array.max() >= 1 << 32):
                    raise UsageError("token ids must lie in [0, 2**32)")
                if dtype.itemsize == 2 and array.size and array.max() >= 1 << 16:
                    raise UsageError("a token id is beyond the tokenizer's vocabulary")
                out.write(array.astype(dtype).tobytes())
                count += int(array.size)

            if rows:
                assert offsets_file is not None
                offsets_file.write(np.zeros(1, dtype="<i8").tobytes())
                for n, row in enumerate(docs()):
                    if n % PIECE_DOCS == 0:
                        check()
                    write(row)
                    offsets_file.write(np.asarray([count], dtype="<i8").tobytes())
                    n_rows += 1
            else:
                assert eos_id is not None
                _stream_documents(tok, docs(), eos_id, write, check)
            out.flush()
            os.fsync(out.fileno())
        if offsets_file is not None:
            offsets_file.flush()
            os.fsync(offsets_file.fileno())
            offsets_file.close()
            os.replace(tmp_offsets, folder / f"{key}.offsets")
        os.replace(tmp_tokens, folder / f"{key}.tokens")
        meta = {"format": FORMAT, "dtype": dtype.name, "count": count, "rows": n_rows}
        tmp_record = folder / f".{key}.{os.getpid()}.json.tmp"
        tmp_record.write_text(json.dumps(meta))
        os.replace(tmp_record, folder / f"{key}.json")  # the record last: complete from now
    except BaseException:
        if offsets_file is not None:
            offsets_file.close()
        tmp_tokens.unlink(missing_ok=True)
        tmp_offsets.unlink(missing_ok=True)
        raise
