"""What a test does when this machine lacks a tool it needs (a browser, SAELens, network
namespaces): skip and say why — except under CI (``CI=true``), whose ``.ci/run`` and test command
provide every such tool, where it fails, so CI cannot pass without running the test."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def missing(reason: str) -> NoReturn:
    """Skip with ``reason`` (what is missing and how to get it); fail under CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} — under CI this is a failure: .ci/run provides it")
    pytest.skip(reason)
