"""SAELens itself, for the tests that check cloche's files against it (``sae_lens`` or None).

SAELens is no dependency of cloche, nor an extra: its releases require transformer-lens < 4,
which cloche's tests pin at 4.3, so ``pip install --no-deps sae-lens`` adds it for these tests
(the SAE classes need nothing that cloche's test environment lacks).
Its releases to date (6.x) import ``HookedRootModule`` from ``transformer_lens.HookedTransformer``
and pull in ``HookedSAETransformer`` from the package's ``__init__``; TransformerLens 4, which
cloche's tests pin, moved that class to ``transformer_lens.HookedRootModule`` and removed
``HookedTransformer``. So when the plain import fails for that reason, this module names the
moved class under its old module path and loads ``sae_lens.saes`` (the SAE classes, their
config, save and load code, all unchanged) without the package's ``__init__``: the code that
reads and writes dictionaries is SAELens' own, only the model-wrapping parts are left out.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import logging
import sys
import types
import warnings
from typing import Any

REASON = ""


def _load() -> Any:
    global REASON
    if importlib.util.find_spec("sae_lens") is None:
        REASON = "sae_lens is not installed (pip install --no-deps sae-lens)"
        return None
    with warnings.catch_warnings():  # its import-time deprecation notices are not ours
        warnings.simplefilter("ignore")
        if importlib.util.find_spec("transformer_lens.HookedTransformer") is not None:
            import sae_lens.saes

            return sae_lens.saes
        from transformer_lens.HookedRootModule import HookedRootModule

        alias = types.ModuleType("transformer_lens.HookedTransformer")
        alias.HookedRootModule = HookedRootModule  # type: ignore[attr-defined]
        sys.modules.setdefault("transformer_lens.HookedTransformer", alias)
        spec = importlib.util.find_spec("sae_lens")
        assert spec is not None and spec.submodule_search_locations is not None
        package = types.ModuleType("sae_lens")
        package.__path__ = list(spec.submodule_search_locations)
        package.__version__ = _version()  # type: ignore[attr-defined]
        package.logger = logging.getLogger("sae_lens")  # type: ignore[attr-defined]
        sys.modules.setdefault("sae_lens", package)
        try:
            module = importlib.import_module("sae_lens.saes")
        except ImportError as exc:
            REASON = f"sae_lens does not import next to this transformer_lens: {exc}"
            return None
        _register(spec.origin, module)
        return module


def _register(init_path: str | None, module: Any) -> None:
    """Run the ``register_sae_class(...)`` statements of SAELens' ``__init__`` (what maps an
    ``architecture`` to its class for ``SAE.load_from_disk``), taken from its own source."""
    registry = importlib.import_module("sae_lens.registry")
    assert init_path is not None
    with open(init_path) as file:
        tree = ast.parse(file.read())
    calls = [node for node in tree.body if isinstance(node, ast.Expr)
             and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Name)
             and node.value.func.id.startswith("register_sae")]
    namespace = {**vars(module), **vars(registry)}
    exec(compile(ast.Module(body=calls, type_ignores=[]), init_path, "exec"), namespace)


def _version() -> str:
    from importlib.metadata import version

    return version("sae-lens")


saes = _load()
