"""docs/tutorial.md runs as written, as a client of a real server on the default model."""

from __future__ import annotations

import re
from pathlib import Path

import cloche
import pytest

from tests.experiments.conftest import default_available, default_dir

TUTORIAL = Path(__file__).resolve().parents[2] / "docs" / "tutorial.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.slow
def test_tutorial_runs_against_a_server(capsys):
    assert default_available(), "the shipped default model's weights are missing"
    from cloche.server.app import Server
    from cloche.server.config import ServerConfig

    server = Server(cloche.load(default_dir()), ServerConfig(token="tutorial-test-token", port=0))
    host, port = server.start()
    namespace: dict = {}
    try:
        for block in python_blocks(TUTORIAL.read_text()):
            # the reader pastes their server's address and token; the test uses its own
            code = re.sub(r"^ADDRESS = .*$", f'ADDRESS = "{host}:{port}"', block,
                          flags=re.MULTILINE)
            code = re.sub(r"^TOKEN = .*$", 'TOKEN = "tutorial-test-token"', code,
                          flags=re.MULTILINE)
            exec(compile(code, str(TUTORIAL), "exec"), namespace)  # the docs' own code
    finally:
        if "model" in namespace:
            namespace["model"].close()
        server.shutdown()
    printed = capsys.readouterr().out
    assert "induction head: layers." in printed and "without the induction head" in printed
    # the tutorial shows the current conventions, and they behave as it says
    events = namespace["events"]
    assert events[0]["type"] == "started" or events[0]["type"] == "queued"
    assert events[-1]["type"] == "done" and events[-1]["ok"] is True
    assert any(e["type"] == "progress" for e in events)
    assert "fetch(key) stacks the entries on a new first axis" in printed  # the handle's repr
    assert isinstance(type(namespace["handle"]).nbytes, property)  # not a method
    assert re.search(r"\d+ bytes on the server; \[", printed)
    assert "CallError: function per_token raised ZeroDivisionError" in printed
    assert "first 4 position(s) of each example skipped; one entry per example" in printed
    assert namespace["corpus"].loss_clean > 0  # dataset= takes a dataset name
    hit = namespace["hit"]
    # what the prose claims, wherever the model has an induction head (the default-model test
    # in test_heads_ablation.py requires that it does)
    if namespace["score"] > 0.3 and namespace["others"]:
        miss = namespace["miss"]
        assert hit.loss_ablated - hit.loss_clean > abs(miss.loss_ablated - miss.loss_clean)
    assert len(namespace["grid"].grid) == namespace["model"].n_layers
