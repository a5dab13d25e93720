"""``serve_distributed`` — what ``cloche serve --world-size N`` calls — end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _serve(directory: Path, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.sharding.launch_job", str(directory), mode],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def test_serve_returns_zero_after_serving(tiny4_dir):
    done = _serve(tiny4_dir("gpt2"), "ok")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served ok" in done.stdout


def test_a_lost_rank_ends_the_server_with_code_3_and_a_clear_message(tiny4_dir):
    done = _serve(tiny4_dir("gpt2"), "lose")
    assert done.returncode == 3, done.stderr[-3000:]
    assert "client saw WorkerLost: rank 1 died" in done.stdout
    assert "cloche serve: rank 1 died" in done.stderr
    assert "shutting down (exit code 3)" in done.stderr
