"""Datasets of tokenized examples with stable ids, for dataset-scale runs.

A :class:`Dataset` is an immutable, ordered list of token-id examples; example ``i`` always has
id ``i``, and :meth:`Dataset.batches` yields them in id order, so a server and a client that
build the same dataset (same source, tokenizer and ``seq_len``) agree on every id; they can
check that with :meth:`Dataset.fingerprint`. Dataset-scale runs (activation statistics,
top-activating examples) therefore ship a dataset *name* and example ids, never the tokens.

Sources:

- :func:`from_texts` — one example per text, truncated to ``seq_len``.
- :func:`from_path` — a text file, a directory of text files (sorted, recursive), or JSONL
  (one document per line, in ``field``). Documents are joined into one stream, each preceded
  by the tokenizer's eos token, and cut into ``seq_len`` examples (only the last may be
  shorter).
- :func:`default` — the default model's corpus: ``"heldout"`` (shipped with cloche, identical
  on every machine) or ``"train"`` (read from this machine's standard library), with the same
  joining and chunking as :func:`from_path`.
- :func:`from_tokens` — token ids on disk (``.npy``, raw ``.bin``), read a batch at a time.
- :func:`from_hf` — a Hugging Face ``datasets`` dataset (Arrow, local files, the HF cache).
- :func:`get` — by name: ``"default:train"``, ``"hf:..."``, a path, with ``?options``
  (``cloche.data.names`` has the table). ``run_dataset`` resolves names where the model runs.

Everything but :func:`from_texts` streams: texts are tokenized once into an on-disk cache
(``cloche.data.cache``, keyed by content and tokenizer; :func:`set_cache_dir` moves it) and
examples are read from files one batch at a time, so a dataset's size is bounded by the disk.
"""

from cloche.data.cache import set_cache_dir
from cloche.data.dataset import Batch, Dataset
from cloche.data.hf import from_hf
from cloche.data.sources import default, from_path, from_texts, from_tokens, get

__all__ = ["Batch", "Dataset", "default", "from_hf", "from_path", "from_texts", "from_tokens",
           "get", "set_cache_dir"]
