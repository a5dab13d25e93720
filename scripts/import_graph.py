"""Print the import graph between cloche's packages, and every private name imported across them.

    python scripts/import_graph.py            # edges "a -> b (n imports)", then private imports
    python scripts/import_graph.py --dot      # the same graph in Graphviz dot

A "package" is the first component under ``cloche`` (``cloche.api.model`` -> ``api``; top-level
modules such as ``cli`` count as their own). Imports inside ``if TYPE_CHECKING:`` count too: a
type-only dependency still couples two layers.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "cloche"


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "cloche":
        return None
    if len(parts) == 1:
        return "cloche"
    return parts[1].lstrip("_") if parts[1] not in ("__init__", "__main__") else "cloche"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    return (ROOT / name).is_dir() or (ROOT / f"{name}.py").exists()


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    here = module_name(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                package_init = 1 if path.name == "__init__.py" else 0
                anchor = anchor[: len(anchor) - node.level + package_init]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "cloche":  # `from cloche import errors` imports the module cloche.errors
                found += [(f"cloche.{alias.name}" if _is_module(alias.name) else "cloche", [])
                          for alias in node.names]
            else:
                found.append((base, [alias.name for alias in node.names]))
    return found


def graph(root: Path = ROOT) -> tuple[Counter[tuple[str, str]], list[str]]:
    """Package edges with import counts, and the private names imported across packages."""
    global ROOT
    ROOT = root
    edges: Counter[tuple[str, str]] = Counter()
    private: list[str] = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path)
        src = package_of(here)
        for target, names in imports(path):
            dst = package_of(target)
            if dst is None or src is None or dst == src:
                continue
            edges[(src, dst)] += 1
            hidden = [n for n in names if n.startswith("_") and not n.startswith("__")]
            hidden += [p for p in target.split(".")[2:] if p.startswith("_")]
            if hidden and dst != "cloche":
                private.append(f"{here} imports {hidden} from {target}")
    return edges, private


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot")
    parser.add_argument("--root", type=Path, default=ROOT, help="the cloche package folder")
    args = parser.parse_args(argv)
    edges, private = graph(args.root.resolve())
    if args.dot:
        print("digraph cloche {")
        for (a, b), n in sorted(edges.items()):
            print(f'  "{a}" -> "{b}" [label={n}];')
        print("}")
        return 0
    for (a, b), n in sorted(edges.items()):
        print(f"{a} -> {b} ({n})")
    print(f"\nprivate names imported across packages: {len(private)}")
    for line in private:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
