"""A Hugging Face cache directory laid out by hand, as huggingface_hub reads it, for offline tests.

``<cache>/models--org--name/blobs/<sha256>`` holds each file's bytes,
``snapshots/<commit>/<file>`` is a relative symlink to its blob, and ``refs/<branch or tag>``
holds the commit hash (no trailing newline, as huggingface_hub writes it). No tree listing is
cached, so huggingface_hub trusts the snapshot folder as it is.

huggingface_hub reads ``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` into
``huggingface_hub.constants`` once, at import; :func:`use_cache` therefore sets both the
environment (for subprocesses: servers, ranks) and the constants (for this process, where the
library is already imported). Its functions read the constants at call time
(``snapshot_download``: ``constants.HF_HUB_CACHE``; the HTTP layer: ``is_offline_mode()``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib


def repo_folder(cache: pathlib.Path, repo_id: str) -> pathlib.Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: pathlib.Path, repo_id: str, source: pathlib.Path, *,
                 refs: tuple[str, ...] = ("main",), commit: str | None = None) -> pathlib.Path:
    """Put the files of the directory ``source`` into the cache as one commit of ``repo_id``;
    point ``refs`` at it. Returns the snapshot folder."""
    repo = repo_folder(cache, repo_id)
    if commit is None:
        digest = hashlib.sha1()
        for f in sorted(source.iterdir()):
            digest.update(f.name.encode() + f.read_bytes())
        commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / f.name
        if not link.exists():
            link.symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def use_cache(monkeypatch, home: pathlib.Path) -> pathlib.Path:
    """Make ``home/hub`` the Hugging Face cache, offline, here and in subprocesses.

    Returns the cache folder (``HF_HUB_CACHE``).
    """
    import huggingface_hub.constants as constants

    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    for name, value in (("HF_HOME", str(home)), ("HF_HUB_CACHE", str(cache)),
                        ("HF_HUB_OFFLINE", "1"), ("HF_HUB_DISABLE_TELEMETRY", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRANSFORMERS_CACHE", raising=False)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache
