"""Where a model's files are: a local directory, or a hub name resolved through the HF cache.

:func:`resolve_model` turns what a user typed (``./my-model``, ``gpt2``, ``org/name``) into a
local directory holding ``config.json``. A directory is taken as it is. A hub name goes through
``huggingface_hub.snapshot_download``, the library's own code, so the Hugging Face cache,
``HF_HOME``/``HF_HUB_CACHE``, ``HF_HUB_OFFLINE``, tokens and file locks behave exactly as they
do for transformers: online it downloads what is missing, offline (or without a network) it
answers from the cache. Only what ``from_pretrained`` reads is fetched: the JSON and tokenizer
files, then the weights the checkpoint's index names (safetensors, else PyTorch ``.bin``).

Callers resolve once and hand the directory on: a sharded launch resolves in the launcher and
gives every rank the snapshot path, so no rank downloads anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cloche.errors import UsageError

__all__ = ["ModelSource", "display_name", "hub_errors", "resolve_model"]

#: files ``from_pretrained`` and the tokenizer read, besides the weights (top level only)
_METADATA_PATTERNS = ["*.json", "*.txt", "*.model", "*.tiktoken", "*.jinja", "tokenizer*"]
_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")


@dataclass(frozen=True)
class ModelSource:
    """A model's local directory, and the name to show for it.

    ``repo_id`` and ``commit`` are set when the directory is a snapshot of a hub repository.
    """

    path: Path
    name: str
    repo_id: str | None = None
    commit: str | None = None


def display_name(path: str | os.PathLike[str]) -> str:
    """``org/name`` for a snapshot in the Hugging Face cache, else the directory's own name."""
    p = Path(path)
    if p.parent.name == "snapshots":
        match = _SNAPSHOT.match(p.parent.parent.name)
        if match:
            return match.group("repo").replace("--", "/")
    return p.name


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", "\\")) or os.path.isabs(text)
            or text.count("/") > 1 or text in (".", "..") or os.path.exists(text))


def resolve_model(source: str | os.PathLike[str], *, revision: str | None = None
                  ) -> ModelSource:
    """The local directory of ``source``: a model directory, or a hub name (via the cache).

    ``revision`` (a branch, tag or commit) applies to hub names only. A :class:`UsageError`
    says what was tried and how to fix it when neither works.
    """
    text = os.fspath(source)
    directory = Path(text).expanduser()
    if directory.is_dir():
        if revision is not None:
            raise UsageError(f"revision={revision!r} applies to hub names, but {text!r} is a"
                             " local directory (check out the revision you want there)")
        if not (directory / "config.json").is_file():
            raise UsageError(f"{text!r} is not a model directory (no config.json); save one with"
                             " save_pretrained, or give a hub name such as 'org/name'")
        return ModelSource(directory, directory.name)
    if isinstance(source, os.PathLike) or _looks_like_path(text):
        raise UsageError(f"{text!r} is not a model directory (it does not exist, or has no"
                         " config.json)")
    return _from_hub(text, revision)


def _from_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is neither a local model directory nor a hub name like"
                         f" 'org/name' ({exc})") from exc
    snapshot = _download(repo_id, revision, _METADATA_PATTERNS)
    commit = snapshot.name
    if not (snapshot / "config.json").is_file():
        raise UsageError(f"the hub repository {repo_id!r} (revision {revision or 'main'},"
                         f" commit {commit}) has no config.json: it is not a transformers model")
    candidates = _weight_files(snapshot)
    for weights in candidates:
        if not all((snapshot / w).exists() for w in weights):
            _download(repo_id, commit, weights)
        if all((snapshot / w).exists() for w in weights):
            return ModelSource(snapshot, repo_id, repo_id, commit)
    names = " or ".join(", ".join(w) for w in candidates)
    raise UsageError(f"the snapshot of {repo_id!r} (commit {commit}) in {snapshot.parent.parent}"
                     f" has no complete weights ({names}): the download was interrupted, or the"
                     f" repository has none; run once with network access (HF_HUB_OFFLINE unset)"
                     f" or `hf download {repo_id}` to complete it")


def _weight_files(snapshot: Path) -> list[list[str]]:
    """Candidate weight file sets, best first, as ``from_pretrained`` prefers them."""
    candidates = []
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        path = snapshot / index
        if path.is_file():
            try:
                files = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as exc:
                raise UsageError(f"{path} is not a valid checkpoint index ({exc})") from exc
            candidates.append(files)
        else:
            candidates.append([single])
    return candidates


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn huggingface_hub's refusals of ``repo_id`` into errors that say what to do (each
    caller words a missing cache entry itself: what was looked for differs)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError as exc:
        raise UsageError(f"the hub repository {repo_id!r} is gated: accept its terms on the"
                         " hub and log in (`hf auth login`, or set HF_TOKEN)") from exc
    except RepositoryNotFoundError as exc:
        raise UsageError(f"no hub repository {repo_id!r} (or it is private: log in with"
                         " `hf auth login`, or set HF_TOKEN)") from exc
    except RevisionNotFoundError as exc:
        raise UsageError(f"the hub repository {repo_id!r} has no revision {revision!r}"
                         ) from exc


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    """``snapshot_download`` of the top-level files matching ``patterns``; clear errors."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    at = f" at revision {revision!r}" if revision else ""
    with hub_errors(repo_id, revision):
        try:
            path = snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                     ignore_patterns=["*/*"])
        except LocalEntryNotFoundError as exc:
            mode = ("offline mode (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
                    else "the hub could not be reached")
            raise UsageError(
                f"{repo_id!r} is not a local model directory, and the Hugging Face cache"
                f" ({constants.HF_HUB_CACHE}) has no snapshot of it{at}; {mode}. Run once with"
                f" network access (HF_HUB_OFFLINE unset) to download it, or fetch it with"
                f" `hf download {repo_id}` (`huggingface-cli download {repo_id}`), or point"
                f" HF_HUB_CACHE at a cache that has it, or pass a directory saved with"
                f" save_pretrained") from exc
    return Path(path)
