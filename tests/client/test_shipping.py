"""The user's own helper modules travel by value: a probe that calls a function imported from a
file next to the notebook runs on a server that has no such file."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from cloche.client.shipping import _is_local, ship_local_modules

from tests.conftest_server import REPO

CLIENT = textwrap.dedent("""
    import sys
    import torch
    import cloche
    sys.path.insert(0, sys.argv[3])  # the notebook's folder: the server does not have it
    import myhelpers
    cloche.client.ship_by_reference("clientonly")  # as if installed here only

    with cloche.connect(sys.argv[1], token=sys.argv[2]) as model:
        model.run("def f():", probes={"embed": myhelpers.keep_norm}, save="norms")
        got = model.save_context("norms").fetch("norm")
        ids = model.tokenizer("def f():")["input_ids"]
        assert got.shape == (1, 1, len(ids)), got.shape  # (runs, batch, positions)
        assert model.call(myhelpers.square_of_sum, 3) == 36  # call ships the same way
        try:
            model.run("x", probes={"embed": myhelpers.uses_clientonly})
        except cloche.UsageError as exc:
            text = str(exc)
            assert "module 'clientonly'" in text and "register_pickle_by_value" in text, text
            print("clear error:", text.splitlines()[0])
        print("helpers ran on the server")
""")

HELPERS = textwrap.dedent("""
    import math

    import clientonly

    OFFSET = 1  # a module global the shipped function reads


    def _norm(x):
        return x.norm(dim=-1)


    def keep_norm(ctx, x):
        ctx.save("norm", _norm(x) + OFFSET - 1)


    def square_of_sum(model, n):
        return math.prod([sum(range(n + 1))] * 2)


    def uses_clientonly(ctx, x):
        ctx.save("x", clientonly.twice(x))
""")


def test_a_helper_module_next_to_the_notebook_ships_by_value(served, tmp_path):
    (tmp_path / "myhelpers.py").write_text(HELPERS)
    (tmp_path / "clientonly.py").write_text("def twice(x):\n    return 2 * x\n")
    done = subprocess.run([sys.executable, "-c", CLIENT, served.address, served.token,
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "helpers ran on the server" in done.stdout
    assert "clear error:" in done.stdout


def test_installed_and_cloche_modules_stay_by_reference(tmp_path, monkeypatch):
    import json

    import cloche.api.model
    import torch

    assert not _is_local("json", json) and not _is_local("torch", torch)
    assert not _is_local("cloche.api.model", cloche.api.model)
    (tmp_path / "mine_here.py").write_text("def f():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import mine_here

    try:
        assert _is_local("mine_here", mine_here)
        assert "mine_here" in ship_local_modules()
        assert "mine_here" not in ship_local_modules()  # each module is looked at once
    finally:
        sys.modules.pop("mine_here", None)
