"""The README's table of supported families is the one generated from the adapters."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("families_table",
                                               ROOT / "scripts" / "families_table.py")
families_table = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(families_table)


def test_readme_table_is_generated_from_the_adapters():
    readme = families_table.readme_block((ROOT / "README.md").read_text())
    assert readme == families_table.table(), (
        "the README families table is stale: run python scripts/families_table.py --write")


def test_every_adapter_family_is_in_the_table_and_parity_tested():
    from cloche.model.families import ADAPTERS

    table = families_table.table()
    for adapter in ADAPTERS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {adapter.family} |"))
        assert adapter.summary and not row.endswith("| — |"), row
