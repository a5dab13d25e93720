"""The cloche client: ``connect`` to a server, ``Pool`` over several."""

from cloche.client.executor import RemoteExecutor, connect
from cloche.client.pool import Pool

__all__ = ["Pool", "RemoteExecutor", "connect"]
