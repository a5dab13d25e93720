"""The cloche client: ``connect`` to a server, ``Pool`` over several."""

from cloche.client.executor import RemoteExecutor, connect
from cloche.client.pool import Pool
from cloche.client.shipping import ship_by_reference

__all__ = ["Pool", "RemoteExecutor", "connect", "ship_by_reference"]
