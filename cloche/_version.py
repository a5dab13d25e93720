"""The cloche version, in a module of its own so that the wire layer can announce it in the
handshake without importing the whole package."""

__version__ = "0.1.0"
