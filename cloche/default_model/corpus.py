"""The default model's corpus: the Python standard library's own source files.

Every Python install carries its standard library, so the corpus needs no download. Files are
split into train and held-out *by file*, deterministically, from a hash of the file's path
relative to the stdlib root; the held-out split is shipped inside the package (so evaluation
gives the same numbers on every machine, whatever its Python version), while the training split
is read from the running interpreter and checked against the manifest the shipped model was
trained on.

What is included: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` except
``site-packages``, test suites (directories named ``test``, ``tests``, ``idle_test``),
``__pycache__``, and the two machine-generated build files (``_sysconfigdata_*.py``,
``config-*``), and files that are not valid UTF-8.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cloche.errors import UsageError

__all__ = [
    "HELDOUT_PERCENT",
    "CorpusFile",
    "ManifestDiff",
    "compare_manifest",
    "data_dir",
    "heldout_files",
    "is_heldout",
    "load_manifest",
    "scan_stdlib",
    "stdlib_root",
    "train_files",
    "write_heldout",
    "write_manifest",
]

#: Share of files (by path hash) that go to the held-out split.
HELDOUT_PERCENT = 5

_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
_HELDOUT_NAME = "heldout.jsonl.xz"
_MANIFEST_NAME = "train_manifest.json"


@dataclass(frozen=True)
class CorpusFile:
    """One source file: its path relative to the stdlib root (POSIX form) and its text."""

    path: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def data_dir() -> Path:
    """The package folder that holds the shipped held-out split and the training manifest."""
    return Path(__file__).resolve().parent / "data"


def stdlib_root() -> Path:
    """The running interpreter's standard library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    """Whether a file belongs to the held-out split (a stable hash of its relative path)."""
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % 100 < HELDOUT_PERCENT


def _excluded(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS for part in rel.parts[:-1]):
        return True
    return rel.parts[0].startswith("config-") or rel.name.startswith("_sysconfigdata")


def scan_stdlib(root: Path | None = None) -> Iterator[CorpusFile]:
    """Every corpus file under ``root`` (default: the running stdlib), in sorted path order."""
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise UsageError(f"stdlib folder {str(root)!r} does not exist")
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root)
        if _excluded(rel) or not path.is_file():
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield CorpusFile(rel.as_posix(), text)


def train_files(root: Path | None = None) -> list[CorpusFile]:
    """The training split, read from this machine's standard library."""
    return [f for f in scan_stdlib(root) if not is_heldout(f.path)]


def heldout_files() -> list[CorpusFile]:
    """The shipped held-out split (identical on every machine)."""
    path = data_dir() / _HELDOUT_NAME
    if not path.is_file():
        raise UsageError(f"the shipped held-out split is missing: {str(path)!r}")
    with lzma.open(path, "rt", encoding="utf-8") as fh:
        return [CorpusFile(rec["path"], rec["text"]) for rec in map(json.loads, fh)]


def write_heldout(files: list[CorpusFile], directory: Path | None = None) -> Path:
    """Write the held-out split as xz-compressed JSONL of ``{path, text}`` records."""
    directory = data_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _HELDOUT_NAME
    with lzma.open(path, "wt", encoding="utf-8", preset=9) as fh:
        for f in files:
            fh.write(json.dumps({"path": f.path, "text": f.text}, ensure_ascii=False) + "\n")
    return path


def write_manifest(
    files: list[CorpusFile], python_version: str, directory: Path | None = None
) -> Path:
    """Record which training files (path and sha256) a model was trained on."""
    directory = data_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / _MANIFEST_NAME
    body = {
        "python_version": python_version,
        "heldout_percent": HELDOUT_PERCENT,
        "files": {f.path: f.sha256 for f in files},
    }
    path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


def load_manifest(directory: Path | None = None) -> dict:
    directory = data_dir() if directory is None else Path(directory)
    path = directory / _MANIFEST_NAME
    if not path.is_file():
        raise UsageError(f"the training manifest is missing: {str(path)!r}")
    return json.loads(path.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class ManifestDiff:
    """How this machine's training split differs from the one the shipped model saw."""

    missing: list[str]
    added: list[str]
    changed: list[str]

    @property
    def identical(self) -> bool:
        return not (self.missing or self.added or self.changed)

    def summary(self) -> str:
        if self.identical:
            return "training split identical to the shipped model's manifest"
        parts = []
        for label, names in (
            ("missing here", self.missing),
            ("new here", self.added),
            ("changed", self.changed),
        ):
            if names:
                shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
                parts.append(f"{len(names)} {label} ({shown})")
        return "training split differs from the shipped model's manifest: " + "; ".join(parts)


def compare_manifest(files: list[CorpusFile], manifest: dict) -> ManifestDiff:
    """Compare a training split with a manifest written by :func:`write_manifest`."""
    shipped: dict[str, str] = manifest["files"]
    here = {f.path: f.sha256 for f in files}
    return ManifestDiff(
        missing=sorted(set(shipped) - set(here)),
        added=sorted(set(here) - set(shipped)),
        changed=sorted(p for p in set(here) & set(shipped) if here[p] != shipped[p]),
    )
