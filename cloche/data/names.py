"""Dataset names: how a client names a dataset that lives next to the model.

``run_dataset("...")`` ships a name, never the data: the name is resolved where the model runs
(the server, or this process for ``cloche.load``), so paths are paths on that machine.

=================================  ==============================================================
name                               dataset
=================================  ==============================================================
``default:heldout``                the default model's held-out corpus (shipped with cloche)
``default:train``                  its training corpus (this machine's Python standard library)
``path/to/tokens.npy``             token ids: 1-D = one stream cut into ``seq_len`` examples,
                                   2-D ``(rows, width)`` = one example per row
``path/to/train.bin``              raw token ids, ``uint16`` unless ``?dtype=uint32``
                                   (nanoGPT's ``train.bin``/``val.bin``)
``path/to/file.txt``, a directory  text (a directory: its files, sorted by relative path)
``path/to/docs.jsonl``             one document per line, in ``field`` (``?field=text``)
``hf:<path or hub name>``          a Hugging Face ``datasets`` dataset: a ``save_to_disk``
                                   folder, local data files (``.parquet``, ``.arrow``,
                                   ``.json(l)``, ``.csv``, ``.txt`` or a folder of them), or a
                                   hub name already in the Hugging Face cache; ``?split=``
                                   (``train``), ``?config=``, ``?field=`` (``text``; a column
                                   of token-id lists is used as is, one example per row)
=================================  ==============================================================

Options follow a ``?`` as ``key=value`` pairs joined by ``&``: ``seq_len`` (every source, 128
by default), ``dtype``, ``field``, ``split``, ``config``. Texts are joined into one stream —
each document preceded by the tokenizer's eos token — and cut into ``seq_len`` examples, so
example ``i`` is the same tokens on every run; the stream is tokenized once per content and
tokenizer and cached on disk (``cloche.data.cache``).
"""

from __future__ import annotations

import urllib.parse
from pathlib import Path
from typing import Any

from cloche.data import sources
from cloche.data.dataset import Dataset
from cloche.errors import UsageError

__all__ = ["HF_PREFIX", "parse", "resolve"]

HF_PREFIX = "hf:"
_OPTIONS = {"seq_len", "dtype", "field", "split", "config"}
_TOKEN_SUFFIXES = (".npy", ".bin")


def parse(name: str) -> tuple[str, dict[str, str]]:
    """``"path?seq_len=256&field=body"`` -> ``("path", {"seq_len": "256", "field": "body"})``."""
    base, sep, query = name.rpartition("?")
    if not sep:
        return name, {}
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return name, {}  # a "?" that starts no options is part of the path
    options = dict(pairs)
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise UsageError(f"dataset {name!r} has unknown options {unknown}; known:"
                         f" {sorted(_OPTIONS)}")
    return base, options


def _seq_len(options: dict[str, str], default: int) -> int:
    text = options.pop("seq_len", None)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise UsageError(f"seq_len ({text!r}) must be an int >= 1")
    return value


def _no_more(name: str, options: dict[str, str]) -> None:
    if options:
        raise UsageError(f"dataset {name!r}: options {sorted(options)} do not apply to it")


def resolve(name: str, tokenizer: Any, seq_len: int = 128, *, cancel: Any = None) -> Dataset:
    """The dataset ``name`` means (see the table above), with ``tokenizer`` for texts."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"a dataset name is a non-empty string, not {name!r}")
    base, options = parse(name)
    seq_len = _seq_len(options, seq_len)
    if base.startswith(sources.DEFAULT_PREFIX):
        _no_more(name, options)
        return sources.default(base[len(sources.DEFAULT_PREFIX):], tokenizer=tokenizer,
                               seq_len=seq_len, cancel=cancel)
    if base.startswith(HF_PREFIX):
        from cloche.data.hf import from_hf

        split = options.pop("split", "train")
        config = options.pop("config", None)
        field = options.pop("field", "text")
        _no_more(name, options)
        return from_hf(base[len(HF_PREFIX):], tokenizer, split=split, config=config,
                       field=field, seq_len=seq_len, cancel=cancel, name=name)
    path = Path(base)
    if path.suffix in _TOKEN_SUFFIXES:
        dtype = options.pop("dtype", None)
        _no_more(name, options)
        pad = sources.pad_id_of(sources.tokenizer_for(tokenizer)) if tokenizer else 0
        return sources.from_tokens(path, seq_len=seq_len, dtype=dtype, pad_id=pad, name=name)
    field = options.pop("field", "text")
    _no_more(name, options)
    ds = sources.from_path(path, tokenizer, seq_len=seq_len, field=field, cancel=cancel)
    if name != base or ds.name != name:
        ds.name = name
    return ds
