"""Shared fixtures: tiny real models saved once per session."""

from __future__ import annotations

import cloche
import pytest
import torch
from cloche.client import ship_by_reference
from hypothesis import HealthCheck, settings

from tests.conftest_server import (  # noqa: F401
    certificate,
    served,
    server_model_dir,
    server_token,
)
from tests.needs import missing
from tests.threads import TORCH_THREADS
from tests.tiny_models import save_tiny

# Loaded before any test module is imported, so every @settings(...) inherits it: a busy machine
# must not fail a property test for being slow (a deadline or a data-generation health check).
settings.register_profile("cloche", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cloche")

# The tests are importable by every server they start (in this process, or with this checkout on
# PYTHONPATH), and in-process servers share module state with them (events, counters): ship the
# test modules' functions by reference, as a user would for code both sides import.
ship_by_reference("tests")


# Slow: they start process groups, server subprocesses, torchrun or whole linters. CI runs them
# (the README's test command runs everything); `scripts/check` runs the rest (-m "not slow").
SLOW = ("tests/sharding/", "tests/server/test_restart.py", "tests/server/test_cli.py",
        "tests/server/test_disconnects.py", "tests/experiments/test_tutorial.py",
        "tests/default_model/test_recipe.py", "tests/test_lint.py", "tests/check/test_sharded.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.path.as_posix()
        if any(f"/{part}" in path for part in SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def _torch_threads_for_the_session():
    """Session- and module-scoped fixtures (expected outputs) run at the pinned count too."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _torch_threads(_torch_threads_for_the_session):
    """Every test runs at ``TORCH_THREADS``; whatever a test changes is put back after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(TORCH_THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def needs_shared_memory():
    """The shared-memory tests need what cloche's same-host path needs; elsewhere it stays on
    TCP, and under CI (Linux) their absence is a failure, not a silent skip."""
    from cloche.wire import shm

    if not shm.available():
        missing("same-host shared memory needs Linux with memfd_create, file seals and /proc"
                " (on other platforms cloche stays on TCP)")


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
