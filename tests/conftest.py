"""Shared fixtures: tiny real models saved once per session."""

from __future__ import annotations

import pytest
import torch

import cloche
from tests.conftest_server import served, server_model_dir, server_token  # noqa: F401
from tests.tiny_models import save_tiny

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``tiny_dir(family)`` -> directory of a saved tiny model of that family."""
    made: dict[str, object] = {}

    def make(family: str):
        if family not in made:
            made[family] = save_tiny(family, tmp_path_factory.mktemp(family))
        return made[family]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    """``tiny_model(family)`` -> a cloche Model (shared per session: clear contexts you use)."""
    loaded: dict[str, cloche.Model] = {}

    def get(family: str) -> cloche.Model:
        if family not in loaded:
            loaded[family] = cloche.load(tiny_dir(family))
        return loaded[family]

    return get
