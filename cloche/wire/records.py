"""The record types that travel as ``EXT_RECORD``: an explicit allow-list, by wire name.

A record is a dataclass sent as its wire name plus its fields, so the receiver rebuilds it
without unpickling anything. The receiver accepts only the names below, and only after the peer
has authenticated: before that no record is decoded and no module is imported. Any other
dataclass travels as a pickled field (also only after authentication). Adding a type means one
line here; ``tests/wire`` checks that every entry names a dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from cloche.errors import ProtocolError

__all__ = ["RECORD_TYPES", "record_type", "wire_name"]

_REQUESTS = ("Run", "Generate", "RunDataset", "Call", "Context", "Describe", "ProbePoints",
             "Owner", "Param", "ParamNames", "ListContexts", "Config", "TokenizerFiles", "Ping",
             "RunOutput", "ServerStatus", "AttachDictionary", "DetachDictionary",
             "Dictionaries")

#: every record type that may cross the wire, as ``module:qualname``
RECORD_TYPES: frozenset[str] = frozenset({
    *(f"cloche.api.requests:{name}" for name in _REQUESTS),
    "cloche.model.info:ModelInfo",
    "cloche.model.points:ProbePoint",
})

_resolved: dict[str, type] = {}


_names: dict[type, str] = {}  # record types met so far (a few dozen at most)


def wire_name(obj: Any) -> str | None:
    """The wire name of ``obj``'s type if it travels as a record, else None."""
    kind = type(obj)
    name = _names.get(kind)
    if name is not None:
        return name
    name = f"{kind.__module__}:{kind.__qualname__}"
    if name in RECORD_TYPES and dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _names[kind] = name
        return name
    return None


def record_type(name: Any) -> type:
    """The dataclass for an allowed wire name (imported on first use); ProtocolError otherwise."""
    if not isinstance(name, str) or name not in RECORD_TYPES:
        raise ProtocolError(f"record type {str(name)[:80]!r} is not allowed on the wire")
    kind = _resolved.get(name)
    if kind is None:
        module_name, _, qualname = name.partition(":")
        target: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            target = getattr(target, part)
        if not (isinstance(target, type) and dataclasses.is_dataclass(target)):
            raise ProtocolError(f"{name!r} is not a record type")
        kind = _resolved[name] = target
    return kind
