"""The package layers: every import between cloche's packages goes one way, and names only what
the other package makes public. (``scripts/import_graph.py`` prints the graph this checks.)"""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("import_graph", ROOT / "scripts" / "import_graph.py")
import_graph = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_graph)

# what each package may import (besides itself); "cloche" is the front door, cloche/__init__.py
ALLOWED = {
    "errors": set(),
    "version": set(),  # cloche/_version.py: the release, which the handshake announces
    "model": {"errors"},
    "wire": {"errors", "version"},
    "default_model": {"errors", "data"},
    "data": {"errors", "default_model"},
    "probes": {"errors", "model"},
    # what a sparse dictionary is (SAELens format, the module); training drives a model through
    # its public methods, which it receives
    "dictionaries": {"errors", "probes", "learned"},  # trains by learned.live's loop
    # linear probes, steering vectors: trained like dictionaries, through the public methods
    "learned": {"errors"},
    "api": {"errors", "model", "probes", "data", "dictionaries"},  # a RunDataset checks its
    # dataset; attach_dictionary reads a SAELens folder
    "runtime": {"errors", "model", "probes", "api", "data"},
    "sharding": {"errors", "model", "probes", "api", "runtime", "data"},
    "client": {"errors", "model", "api", "wire"},
    "server": {"errors", "model", "probes", "api", "runtime", "wire"},
    "load": {"errors", "model", "probes", "api", "runtime", "default_model"},
    # built only on the public API: the front door, its errors and datasets
    "experiments": {"cloche", "errors", "data"},
    # the parity battery: the public API, plus loading the plain transformers reference
    # (model) and a sharded launch (sharding) of the same checkpoint
    "check": {"cloche", "errors", "model", "sharding"},
    # the web UI: the public API, like the experiments it shows
    "ui": {"cloche", "errors", "experiments", "data"},
    "cli": {"cloche", "errors", "default_model", "experiments", "server", "sharding", "check",
            "ui"},
    "cloche": {"errors", "load", "api", "client", "model", "probes", "data", "experiments",
               "cli", "version", "dictionaries"},
}


def test_every_package_is_in_the_table():
    packages = {import_graph.package_of(import_graph.module_name(p))
                for p in (ROOT / "cloche").rglob("*.py")}
    assert packages == set(ALLOWED)


def test_imports_go_down_the_layers():
    edges, _ = import_graph.graph(ROOT / "cloche")
    wrong = sorted(f"{a} -> {b}" for a, b in edges if b not in ALLOWED[a])
    assert wrong == []


def test_the_sharding_layer_knows_nothing_of_the_server():
    edges, _ = import_graph.graph(ROOT / "cloche")
    assert ("sharding", "server") not in edges and ("sharding", "client") not in edges


def test_no_package_imports_a_private_name_of_another():
    _, private = import_graph.graph(ROOT / "cloche")
    assert private == []
