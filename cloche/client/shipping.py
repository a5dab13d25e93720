"""Which code travels by value: the user's own modules do, installed packages do not.

A probe defined in a notebook ships by value (cloudpickle does that for ``__main__``), but a
probe that calls a helper imported from ``myhelpers.py`` next to the notebook used to ship that
helper *by reference* — and the server, which has no ``myhelpers``, failed with ``No module
named 'myhelpers'``. Before each request the client registers every loaded module that does not
live in the standard library or an installed package's site-packages with
``cloudpickle.register_pickle_by_value``: such modules (files next to the notebook, a project
checkout on ``sys.path``, an editable install) are exactly the ones a server may lack. Only what
a shipped function actually references travels, not the whole module.

cloche itself always goes by reference (the server runs it). A module that both sides can import
and whose objects must keep their identity (a shared filesystem, the same checkout on both
sides) can be kept by reference with :func:`ship_by_reference`.
"""

from __future__ import annotations

import os
import site
import sys
import sysconfig
import threading
from pathlib import Path
from types import ModuleType

import cloudpickle

__all__ = ["ship_by_reference", "ship_local_modules"]

_lock = threading.Lock()
_seen: set[str] = set()
_modules_seen = 0  # len(sys.modules) at the last look
_by_reference: set[str] = {"cloche"}


def _installed_roots() -> tuple[str, ...]:
    """The folders of the standard library and of installed packages, as resolved paths."""
    paths = sysconfig.get_paths()
    roots = [paths.get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    roots += site.getsitepackages() if hasattr(site, "getsitepackages") else []
    roots.append(site.getusersitepackages())
    return tuple(sorted({str(Path(r).resolve()) + os.sep for r in roots if r}))


_ROOTS = _installed_roots()


def ship_by_reference(*module_names: str) -> None:
    """Keep these top-level packages (and their submodules) by reference: the server imports
    them itself. Use it when the same code is importable on both sides and identity matters."""
    with _lock:
        _by_reference.update(module_names)
        for name, module in list(sys.modules.items()):
            if name.split(".", 1)[0] in module_names and isinstance(module, ModuleType):
                try:
                    cloudpickle.unregister_pickle_by_value(module)
                except ValueError:  # it was not registered
                    pass


def _is_local(name: str, module: ModuleType) -> bool:
    if name == "__main__" or name.split(".", 1)[0] in _by_reference:
        return False
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return False  # built in, frozen, a namespace package or a compiled extension
    try:
        resolved = str(Path(file).resolve())
    except OSError:
        return False
    return not resolved.startswith(_ROOTS)


def ship_local_modules() -> list[str]:
    """Register the not yet seen modules outside installed code for shipping by value (the
    names registered now). Cheap after the first call: only new modules are looked at."""
    global _modules_seen
    registered: list[str] = []
    with _lock:
        if len(sys.modules) == _modules_seen:  # every request passes here: nothing new loaded
            return registered
        _modules_seen = len(sys.modules)
        for name, module in list(sys.modules.items()):
            if name in _seen or not isinstance(module, ModuleType):
                continue
            _seen.add(name)
            if _is_local(name, module):
                try:
                    cloudpickle.register_pickle_by_value(module)
                except ValueError:  # not in sys.modules under that name any more
                    continue
                registered.append(name)
    return registered
