"""Lint and types are part of the test command: ruff's chosen rule set and mypy over the package
(both configured in pyproject.toml), so CI fails on them like on any other test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)


def test_ruff():
    assert shutil.which("ruff"), "ruff is missing: pip install -e '.[test]' installs it"
    result = _run("ruff", "check", "cloche", "tests", "benchmarks", "scripts")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_mypy():
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
