"""``cloche demo`` from a folder that holds a clone named ``cloche``: the server it starts must
import the installed package, not the clone folder (which Python would take as an empty
namespace package: "module 'cloche' has no attribute 'load'")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cloche

SCRIPT = """
import cloche
from cloche.experiments.demo import started_server
with started_server(None, "demo-shadow-token-0123") as address:
    with cloche.connect(address, token="demo-shadow-token-0123") as model:
        print("served", model.name, model.ping("ok"))
"""


def test_the_demo_server_is_not_shadowed_by_a_clone_named_cloche(tmp_path):
    clone = tmp_path / "cloche"  # what `git clone .../cloche` leaves in the folder
    (clone / "cloche").mkdir(parents=True)
    (clone / "README.md").write_text("a clone\n")
    # -P: this test's own interpreter must not be shadowed; the server started inside is the
    # process under test, and it runs `python -m cloche` with the clone's parent as its cwd
    done = subprocess.run([sys.executable, "-P", "-c", SCRIPT], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False,
                          env={"PATH": "/usr/bin:/bin"})  # cloche as installed (.ci/run: -e)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "served cloche-default ok" in done.stdout


def test_the_demo_says_when_a_folder_named_cloche_would_shadow_the_package(tmp_path):
    from cloche.experiments.demo import clone_warning

    assert clone_warning(tmp_path) is None
    (tmp_path / "cloche" / "cloche").mkdir(parents=True)  # what `git clone .../cloche` leaves
    text = clone_warning(tmp_path)
    assert text is not None and str(tmp_path / "cloche") in text
    assert "import cloche" in text and "pip install -e ./cloche" in text
    installed = Path(cloche.__file__).resolve().parent
    assert clone_warning(installed.parent) is None  # the package itself is not a stranger
