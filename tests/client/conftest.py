"""Real-server fixtures (see tests/conftest_server.py)."""

from tests.conftest_server import served, server_model_dir, server_token  # noqa: F401
