"""``cloche check`` as a user runs it: the table on stdout, JSON, and the exit status."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

from cloche import cli
from cloche.model import families
from cloche.model.families import Site

from tests.conftest_server import REPO


def test_cloche_check_prints_the_table_and_exits_0(tiny_dir, tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, "-m", "cloche", "check", "--model",
                           str(tiny_dir("llama")), "--json", str(out), "--threads", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    name = tiny_dir("llama").name
    assert lines[0].startswith(f"cloche check: {name} (llama, 2 layers, float32, cpu) on 2 seeded")
    assert lines[1].split() == ["check", "points", "max", "|diff|", "tolerance", "result"]
    assert any(line.startswith("attn.pattern == output_attentions (eager)") and
               line.endswith("PASS") for line in lines)
    assert lines[-1].startswith("OK: ") and "0 failed" in lines[-1]
    assert "checking gradient probes == autograd" in proc.stderr  # progress goes to stderr
    written = json.loads(out.read_text())
    assert written["ok"] is True and written["model"] == name
    rows = {row["check"]: row for row in written["rows"]}
    pattern = rows["attn.pattern == output_attentions (eager)"]
    assert pattern["status"] == "PASS" and pattern["n_points"] == 2
    assert pattern["max_diff"] <= pattern["tolerance"]
    assert rows["sharded == single process"]["status"] == "SKIP"


def test_a_failing_check_exits_1_and_says_which(monkeypatch, tiny_dir, capsys, tmp_path):
    """resid_mid read after the second norm instead of before it."""
    gpt2 = families.adapter_for("gpt2")
    broken = dataclasses.replace(gpt2, block_sites={**gpt2.block_sites,
                                                    "resid_mid": Site("ln_2", "output")})
    monkeypatch.setitem(families._BY_TYPE, "gpt2", broken)
    out = tmp_path / "check.json"
    assert cli.main(["check", "--model", str(tiny_dir("gpt2")), "--json", str(out)]) == 1
    stdout = capsys.readouterr().out
    row = next(line for line in stdout.splitlines()
               if line.startswith("resid_mid, resid_post == sums of their parts"))
    assert "FAIL: differs at layers.0.resid_mid" in row
    assert stdout.splitlines()[-1].startswith("FAILED: ")
    assert json.loads(out.read_text())["ok"] is False


def test_usage_errors_exit_2(tiny_dir, capsys):
    assert cli.main(["check", "--model", str(tiny_dir("gpt2")), "--world-size", "0"]) == 2
    assert "world_size (0) must be an int >= 1" in capsys.readouterr().err


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "cloche", "check", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    parser = cli.build_parser()._subparsers._group_actions[0].choices["check"]
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings} has no help"
    assert "Exits 0 only if nothing fails" in " ".join(out.split())


def test_a_hub_name_at_a_revision_is_checked_from_the_cache(monkeypatch, tmp_path, tiny_dir,
                                                           capsys):
    from tests.model.hf_cache import add_snapshot, use_cache

    cache = use_cache(monkeypatch, tmp_path / "hf-home")  # offline: the cache alone
    add_snapshot(cache, "org/tiny", tiny_dir("gpt2"), refs=("main",))
    add_snapshot(cache, "org/tiny", tiny_dir("llama"), refs=("v2",))  # main is GPT-2
    assert cli.main(["check", "--model", "org/tiny", "--revision", "v2", "--json",
                     str(tmp_path / "c.json")]) == 0
    stdout = capsys.readouterr().out
    assert stdout.startswith("cloche check: org/tiny (llama, 2 layers")
    written = json.loads((tmp_path / "c.json").read_text())
    assert written["model"] == "org/tiny" and written["family"] == "llama"
