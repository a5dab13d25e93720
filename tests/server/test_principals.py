"""Several named tokens on one server: each principal sees and clears only its own sessions and
contexts, has its own cap on saved bytes, and is named in the server log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import cloche
import pytest
import torch
from cloche import cli
from cloche.client import connect
from cloche.errors import AuthError, ResourceLimit, SessionLost, UsageError
from cloche.server.principals import OWNER, Principal, parse_principals
from cloche.server.sessions import SessionRegistry

from tests.conftest_server import REPO, ServerProcess
from tests.server.helpers import InProcessServer

ALICE = Principal("alice", "alice-token-0123456789", max_saved_bytes=4096)
BOB = Principal("bob", "bob-token-0123456789abc", share=2)


def keep(ctx, x):
    ctx.save("x", x[:, -1])  # one position of the residual stream


@pytest.fixture(scope="module")
def team(server_model_dir):
    with InProcessServer(cloche.load(server_model_dir), token=None,
                         principals=(ALICE, BOB)) as server:
        yield server


def test_each_principal_sees_only_its_own_contexts(team):
    with connect(team.address, token=ALICE.token) as alice, \
            connect(team.address, token=BOB.token) as bob, \
            connect(team.address, token=BOB.token) as bob_again:
        alice.run("def f():", probes={"embed": keep}, save="acts")
        alice.run("def f():", probes={"embed": keep}, save="shared/team")
        bob.run("import os", probes={"embed": keep}, save="acts")
        assert alice.save_contexts() == ["acts", "shared/team"]
        assert bob.save_contexts() == ["acts"]
        assert bob_again.save_contexts() == []  # shared/ is per principal; bob has none yet
        bob.run("import os", probes={"embed": keep}, save="shared/team")
        assert bob_again.save_contexts() == ["shared/team"]
        assert bob_again.save_context("shared/team").num_runs == 1  # bob's, not alice's
        bob_again.save_context("shared/team").clear()  # clears bob's shared context only
        assert alice.save_context("shared/team").num_runs == 1
        assert bob.save_context("acts").num_runs == 1 and alice.save_context("acts").num_runs == 1


def test_another_principals_session_cannot_be_resumed(team):
    with connect(team.address, token=ALICE.token) as alice:
        alice.run("def f():", probes={"embed": keep}, save="private")
        with pytest.raises(SessionLost):
            connect(team.address, token=BOB.token, session=alice.session)
        with connect(team.address, token=ALICE.token, session=alice.session) as again:
            assert again.save_context("private").num_runs == 1


def test_each_principal_has_its_own_cap_on_saved_bytes(team):
    def big(ctx, x):
        ctx.save("big", torch.zeros(2048))  # 8 KiB: over alice's 4 KiB

    with connect(team.address, token=ALICE.token) as alice, \
            connect(team.address, token=BOB.token) as bob:
        with pytest.raises(ResourceLimit, match="principal 'alice'") as info:
            alice.run("x", probes={"embed": big}, save="capped")
        first = str(info.value).splitlines()[0]
        assert "max-saved-bytes" in first and "p/alice" not in first, first
        assert "capped" not in alice.save_contexts()  # rolled back
        bob.run("x", probes={"embed": big}, save="uncapped")
        assert bob.save_context("uncapped").num_runs == 1
        with pytest.raises(UsageError, match="operator"):  # nobody lifts a cap from a session
            alice.call(lambda m: m.executor.execute(cloche.api.requests.Quota(
                prefix="p/alice/", max_bytes=None, label="mine")))
        with pytest.raises(ResourceLimit):
            alice.run("x", probes={"embed": big}, save="capped")


def test_the_log_names_the_principal(team, caplog):
    with caplog.at_level(logging.INFO, logger="cloche"):
        with connect(team.address, token=BOB.token) as bob:
            bob.ping()
        with pytest.raises(AuthError):
            connect(team.address, token="carol-token-0123456789")
    opened = [r.getMessage() for r in caplog.records if "opened from" in r.getMessage()]
    assert any("bob@127.0.0.1:" in line for line in opened), opened
    assert any("refused" in r.getMessage() for r in caplog.records)


def test_sessions_keep_their_principal_across_a_restart(tmp_path):
    registry = SessionRegistry(None, tmp_path / "sessions.json")
    alice, resumed = registry.open(None, "alice")
    assert not resumed
    again = SessionRegistry(None, tmp_path / "sessions.json")
    assert again.open(alice.id, "bob")[1] is False  # not bob's
    session, resumed = again.open(alice.id, "alice")
    assert resumed and session.principal == "alice" and session.prefix == f"p/alice/s/{alice.id}/"


def test_token_file_format():
    assert parse_principals("just-one-token-0123456789\n") == [
        Principal(OWNER, "just-one-token-0123456789")]
    team = parse_principals("# the team\nalice alice-token-0123456789 max-saved-bytes=2GiB share=3\n"
                            "bob   bob-token-0123456789abc   # no options\n")
    assert team == [Principal("alice", "alice-token-0123456789", 2 * 2**30, 3),
                    Principal("bob", "bob-token-0123456789abc")]
    assert "alice-token" not in repr(team) and "alice-token" not in repr(team[0])
    for text, message in [
        ("", "empty"),
        ("alice alice-token-0123456789\nalice other-token-0123456789", "twice"),
        ("alice same-token-0123456789ab\nbob same-token-0123456789ab", "same token"),
        ("alice short\nbob bob-token-0123456789abc", "at least 16"),
        ("alice alice-token-0123456789 colour=red\nbob bob-token-0123456789abc", "colour"),
        ("alice alice-token-0123456789 share=0\nbob bob-token-0123456789abc", "share"),
        ("al/ice alice-token-0123456789\nbob bob-token-0123456789abc", "principal names"),
        ("alice\nbob bob-token-0123456789abc", "line 1"),
    ]:
        with pytest.raises(UsageError, match=message):
            parse_principals(text)


def test_cloche_serve_with_a_team_token_file(server_model_dir, tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"alice {ALICE.token}\nbob {BOB.token} share=2\n")
    token_file.chmod(0o600)
    server = ServerProcess(server_model_dir, "unused-env-token-0123", "--token-file",
                           str(token_file), "--log-level", "INFO", log_path=tmp_path / "log")
    try:
        with connect(server.address, token=ALICE.token) as alice, \
                connect(server.address, token=BOB.token) as bob:
            alice.run("def f():", probes={"embed": keep}, save="mine")
            assert bob.save_contexts() == [] and alice.save_contexts() == ["mine"]
        with pytest.raises(AuthError):
            connect(server.address, token="unused-env-token-0123")  # the file wins
    finally:
        server.stop()
    log = (tmp_path / "log").read_text()
    assert "alice@127.0.0.1:" in log and "bob@127.0.0.1:" in log
    assert ALICE.token not in log and BOB.token not in log


def test_a_bad_token_file_stops_the_server_with_the_line(tmp_path):
    token_file = tmp_path / "tokens"
    token_file.write_text("alice alice-token-0123456789\nbob tooshort\n")
    token_file.chmod(0o600)
    done = subprocess.run([sys.executable, "-m", "cloche", "serve", "--token-file",
                           str(token_file)], cwd=REPO, capture_output=True, text=True,
                          check=False, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert done.returncode == 2 and "line 2" in done.stderr and "bob" in done.stderr


def test_the_server_caps_saved_bytes_by_default(server_model_dir):
    args = cli.build_parser().parse_args(["serve"])
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert args.max_saved_bytes == total // 2  # never the whole machine, unless asked
    assert cli.build_parser().parse_args(["serve", "--max-saved-bytes", "none"]
                                         ).max_saved_bytes is None

    def big(ctx, x):
        ctx.save("big", torch.zeros(2048))  # 8 KiB

    with InProcessServer(cloche.load(server_model_dir), max_saved_bytes=4096) as server, \
            connect(server.address, token=server.token) as model:
        with pytest.raises(ResourceLimit, match="--max-saved-bytes"):
            model.run("x", probes={"embed": big}, save="c")
        assert model.save_contexts() == []
        model.run("x", probes={"embed": keep}, save="c")  # small saves still fit
        assert model.save_context("c").num_runs == 1


def test_a_sessions_file_from_before_principals_resumes_as_the_owners(tmp_path):
    import json

    path = tmp_path / "sessions.json"
    path.write_text(json.dumps({"sessions": ["a" * 32, 5]}))  # the old format, and junk
    session, resumed = SessionRegistry(None, path).open("a" * 32)
    assert resumed and session.principal == OWNER
