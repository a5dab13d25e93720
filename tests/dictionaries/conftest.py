"""The sharded tests' tiny 4-block models, for the dictionaries' sharded tests."""

from tests.sharding.conftest import tiny4_dir  # noqa: F401
