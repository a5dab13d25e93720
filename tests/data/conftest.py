"""Every test here tokenizes into a cache folder of its own (never the user's ~/.cache)."""

from __future__ import annotations

import pytest
from cloche.data import cache


@pytest.fixture(autouse=True)
def token_cache(tmp_path):
    before = cache._dir
    cache.set_cache_dir(tmp_path / "token-cache")
    cache._opened.clear()
    yield tmp_path / "token-cache"
    cache.set_cache_dir(before)
    cache._opened.clear()
