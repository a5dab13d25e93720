"""``cloche serve``: flags, token sources, TLS, clean shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys

import pytest
from cloche import cli
from cloche.client import connect
from cloche.errors import ConnectionError, UsageError

from tests.conftest_server import REPO, ServerProcess
from tests.threads import TORCH_THREADS


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "cloche", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    for action in serve._actions:
        for flag in action.option_strings:
            assert flag in out
        assert action.help, f"{action.option_strings} has no help"
    assert "127.0.0.1" in out and "CLOCHE_TOKEN" in out


def test_sizes_durations_and_token_sources(tmp_path):
    assert cli.parse_size("512MiB") == 512 * 2**20 and cli.parse_size("2G") == 2 * 2**30
    assert cli.parse_size("1000") == 1000
    assert cli.parse_duration("30m") == 1800 and cli.parse_duration("never") is None
    assert cli.parse_duration("90") == 90
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert cli.resolve_token(str(token_file), {"CLOCHE_TOKEN": "env"}) == ("from-file", False)
    assert cli.resolve_token(None, {"CLOCHE_TOKEN": "env"}) == ("env", False)
    token, generated = cli.resolve_token(None, {})
    assert generated and len(token) >= 24
    with pytest.raises(UsageError):
        cli.resolve_token(str(tmp_path / "missing"), {})


def torch_threads(model) -> int:
    import torch

    return torch.get_num_threads()


def test_threads_flag_pins_the_server(served, server_model_dir, tmp_path):
    with connect(served.address, token=served.token) as model:
        assert model.call(torch_threads) == TORCH_THREADS  # what the tests compare against
    server = ServerProcess(server_model_dir, "t", "--threads", "3", log_path=tmp_path / "log")
    try:  # the flag wins over the OMP_NUM_THREADS the test servers also get
        with connect(server.address, token="t") as model:
            assert model.call(torch_threads) == 3
    finally:
        server.stop()
    done = subprocess.run([sys.executable, "-m", "cloche", "serve", "--threads", "0"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--threads (0) must be at least 1" in done.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return cert, key


def test_tls_token_file_and_clean_sigint_shutdown(server_model_dir, certificate, tmp_path):
    cert, key = certificate
    token_file = tmp_path / "token"
    token_file.write_text("file-token")
    server = ServerProcess(server_model_dir, "ignored-env-token", "--token-file", str(token_file),
                           "--tls-cert", str(cert), "--tls-key", str(key),
                           log_path=tmp_path / "log")
    try:
        with connect(server.address, token="file-token", tls=cert) as model:
            assert model.ping("over tls") == "over tls"
            assert model.run("def f():").logits.shape[0] == 1
        with pytest.raises(ConnectionError):
            connect(server.address, token="file-token", timeout=10)  # plain TCP to a TLS server
        with pytest.raises(ConnectionError):
            connect(server.address, token="ignored-env-token", tls=cert)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(120) == 0
        assert "cloche: server stopped" in server.remaining_output()
    finally:
        server.stop()
    assert b"refused" in (tmp_path / "log").read_bytes()
