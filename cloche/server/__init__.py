"""The cloche server: ``cloche serve`` on the command line, :class:`Server` in Python."""

from cloche.server.app import Server
from cloche.server.config import ServerConfig

__all__ = ["Server", "ServerConfig"]
