"""The cloche client: ``connect`` to a server, ``Pool`` over several."""

from cloche.client.connection import RemoteFuture
from cloche.client.handles import RemoteSaveContext
from cloche.client.pool import Pool
from cloche.client.remote import RemoteModel, connect

__all__ = ["Pool", "RemoteFuture", "RemoteModel", "RemoteSaveContext", "connect"]
