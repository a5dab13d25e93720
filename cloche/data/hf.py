"""Hugging Face ``datasets`` as a source: Arrow tables read in pieces, never loaded whole.

``datasets`` keeps a dataset as memory-mapped Arrow files (a ``save_to_disk`` folder, or its
cache of converted local files and downloaded hub datasets), so reading a column in pieces costs
one piece of memory. A text column is tokenized into the cache (``cloche.data.cache``); a column
of token-id lists (a pre-tokenized dataset, as SAELens publishes) is copied as is, one example
per row. The cache key is the dataset's own fingerprint (``datasets`` derives it from the data
files and the transforms applied), the column and the tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cloche.data import sources
from cloche.data.cache import tokenized
from cloche.data.dataset import Dataset
from cloche.errors import UsageError

__all__ = ["from_hf"]

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json",
             ".csv": "csv", ".txt": "text"}
_ROWS_PER_READ = 256


def _load(spec: str, split: str, config: str | None) -> Any:
    import datasets  # type: ignore[import-untyped]

    path = Path(spec).expanduser()
    try:
        if path.is_dir() and any((path / f).exists() for f in
                                 ("state.json", "dataset_dict.json", "dataset_info.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise UsageError(f"{spec!r} has splits {sorted(loaded)}, not {split!r}")
                loaded = loaded[split]
            return loaded
        if path.is_file():
            builder = _BUILDERS.get(path.suffix)
            if builder is None:
                raise UsageError(f"{spec!r}: datasets reads {sorted(_BUILDERS)} files, not"
                                 f" {path.suffix!r}")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), config, split=split)
        return datasets.load_dataset(spec, config, split=split)  # a hub name, from the cache
    except UsageError:
        raise
    except Exception as exc:  # datasets raises many kinds; translated once, here
        raise UsageError(f"cannot load the Hugging Face dataset {spec!r} (split {split!r}):"
                         f" {type(exc).__name__}: {exc}") from exc


def from_hf(spec: str, tokenizer: Any, *, split: str = "train", config: str | None = None,
            field: str = "text", seq_len: int = 128, cancel: Any = None,
            name: str | None = None) -> Dataset:
    """A ``datasets`` dataset's column ``field``: text (tokenized, joined, cut into ``seq_len``
    examples) or token-id lists (one example per row, cut to ``seq_len``)."""
    ds = _load(spec, split, config)
    if field not in ds.column_names:
        raise UsageError(f"{spec!r} has columns {ds.column_names}, not {field!r} (name another"
                         " with ?field=)")
    feature = ds.features[field]
    is_text = getattr(feature, "dtype", None) in ("string", "large_string")
    column = ds.select_columns([field])
    fingerprint = getattr(ds, "_fingerprint", None) or spec
    key = f"hf|{fingerprint}|{field}"

    def values() -> Iterator[Any]:
        for piece in column.iter(batch_size=_ROWS_PER_READ):
            yield from piece[field]

    label = name or f"hf:{spec}"
    if is_text:
        tok = sources.tokenizer_for(tokenizer)
        return sources._stream_dataset(key, values, tok, seq_len=seq_len, name=label,
                                       cancel=cancel)
    if not _is_int_list(feature):
        raise UsageError(f"column {field!r} of {spec!r} holds {feature}; cloche reads text or"
                         " lists of token ids")
    tokens, offsets = tokenized(key, values, None, rows=True, cancel=cancel)
    pad = sources.pad_id_of(sources.tokenizer_for(tokenizer)) if tokenizer is not None else 0
    return Dataset.from_tokens(tokens, name=label, seq_len=seq_len, pad_id=pad,
                               offsets=offsets)


def _is_int_list(feature: Any) -> bool:
    inner = getattr(feature, "feature", None)
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return getattr(inner, "dtype", "").startswith(("int", "uint"))
