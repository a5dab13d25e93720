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


def test_the_tutorial_states_the_model_and_the_install_as_they_are():
    """The transcript's layer count is the shipped model's, and its install command the
    README's (they had drifted: 3 layers for a 2-layer model, another pip line)."""
    import json

    text = TUTORIAL.read_text()
    config = json.loads((default_dir() / "config.json").read_text())
    layers = re.search(r"serving cloche-default \((\d+) layers\)", text)
    assert layers and int(layers.group(1)) == config["num_hidden_layers"]
    install = re.search(r"^\$ (pip install .*?)\s+#", text, flags=re.MULTILINE)
    readme = (TUTORIAL.parents[1] / "README.md").read_text()
    assert install and install.group(1) in readme
    assert len(python_blocks(text)) >= 10  # what test_tutorial_runs_against_a_server executes
