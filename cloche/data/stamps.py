"""Content hashes remembered by file stamps, so that unchanged files are not read again.

Hashing a corpus (to key its tokenization, or to fingerprint a token file) reads every byte;
for a large corpus that is seconds to minutes on every run. :func:`remembered` keys the hash by
the files' *stamps* — path, size, modification time in nanoseconds, inode — and keeps it in the
cache folder: while no file changes, the hash is read back instead of computed (as ``make``
and ``rsync`` decide what changed). A file rewritten within one tick of its clock with the same
size would go unnoticed; run ``cloche.data.set_cache_dir`` to a fresh folder to force a rehash.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["remembered", "stamp_of"]


def stamp_of(paths: Iterable[Path]) -> str:
    """sha256 over the paths' stamps (resolved path, size, mtime_ns, inode)."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{Path(path).resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}\n".encode())
    return h.hexdigest()


def remembered(kind: str, stamp: str, compute: Callable[[], str]) -> str:
    """``compute()``, or what it gave last time for the same ``kind`` and ``stamp``."""
    from cloche.data.cache import cache_dir

    folder = cache_dir() / "stamps"
    path = folder / hashlib.sha256(f"{kind}|{stamp}".encode()).hexdigest()
    try:
        known = path.read_text().strip()
        if known:
            return known
    except OSError:
        pass
    value = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(value)
        os.replace(tmp, path)
    except OSError:
        pass  # only an optimisation: the next run computes it again
    return value
