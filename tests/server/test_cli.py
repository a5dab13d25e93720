"""``cloche serve``: flags, token sources, TLS, clean shutdown on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from cloche import cli
from cloche.client import connect
from cloche.errors import AuthError, ConnectionError, UsageError
from cloche.server.config import ServerConfig, is_loopback

from tests.conftest_server import REPO, ServerProcess
from tests.threads import TORCH_THREADS

TOKEN = "a-test-token-of-24-chars"
FILE_TOKEN = "token-from-the-file-0123"


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
    token_file.write_text("from-file-token-0123\n")
    token_file.chmod(0o600)
    assert cli.resolve_token(str(token_file), {"CLOCHE_TOKEN": "env"}) == (
        "from-file-token-0123", (), False)
    assert cli.resolve_token(None, {"CLOCHE_TOKEN": "env"}) == ("env", (), False)
    token, _, generated = cli.resolve_token(None, {})
    assert generated and len(token) >= 24
    with pytest.raises(UsageError):
        cli.resolve_token(str(tmp_path / "missing"), {})


def torch_threads(model) -> int:
    import torch

    return torch.get_num_threads()


def test_threads_flag_pins_the_server(served, server_model_dir, tmp_path):
    with connect(served.address, token=served.token) as model:
        assert model.call(torch_threads) == TORCH_THREADS  # what the tests compare against
    server = ServerProcess(server_model_dir, TOKEN, "--threads", "3", log_path=tmp_path / "log")
    try:  # the flag wins over the OMP_NUM_THREADS the test servers also get
        with connect(server.address, token=TOKEN) as model:
            assert model.call(torch_threads) == 3
    finally:
        server.stop()
    done = subprocess.run([sys.executable, "-m", "cloche", "serve", "--threads", "0"], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--threads (0) must be at least 1" in done.stderr


def test_tls_token_file_and_clean_sigint_shutdown(server_model_dir, certificate, tmp_path):
    cert, key = certificate
    token_file = tmp_path / "token"
    token_file.write_text(FILE_TOKEN)
    token_file.chmod(0o600)
    server = ServerProcess(server_model_dir, "ignored-env-token", "--token-file", str(token_file),
                           "--tls-cert", str(cert), "--tls-key", str(key), "--host", "0.0.0.0",
                           log_path=tmp_path / "log")
    server.address = f"127.0.0.1:{server.port}"  # every interface, loopback included, over TLS
    try:
        with connect(server.address, token=FILE_TOKEN, tls=cert) as model:
            assert model.ping("over tls") == "over tls"
            assert model.run("def f():").logits.shape[0] == 1
        with pytest.raises(ConnectionError, match="only accepts TLS") as info:
            connect(server.address, token=FILE_TOKEN, timeout=10)  # plain TCP to a TLS server
        assert not isinstance(info.value, AuthError)
        with pytest.raises(ConnectionError):
            connect(server.address, token="ignored-env-token", tls=cert)
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(120) == 0
        assert "cloche: server stopped" in server.remaining_output()
    finally:
        server.stop()
    assert b"refused" in (tmp_path / "log").read_bytes()


def test_serving_off_loopback_without_tls_is_refused_before_loading_anything(server_model_dir):
    env = dict(os.environ, CLOCHE_TOKEN=TOKEN, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloche", "serve", "--model", str(server_model_dir),
         "--host", "0.0.0.0", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        listening = any(line.startswith("listening on") for line in proc.stdout)  # stops at one
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(60)
        stderr = proc.stderr.read()
        proc.stdout.close()
        proc.stderr.close()
    assert not listening, "the server listened on every interface without TLS"
    assert proc.returncode == 2
    assert "--insecure-no-tls" in stderr and "--tls-cert" in stderr and "TLS" in stderr


def test_insecure_no_tls_serves_off_loopback_with_a_loud_warning(server_model_dir, tmp_path):
    server = ServerProcess(server_model_dir, TOKEN, "--host", "0.0.0.0", "--insecure-no-tls",
                           log_path=tmp_path / "log")
    try:
        with connect(f"127.0.0.1:{server.port}", token=TOKEN) as model:
            assert model.ping("plain") == "plain"
    finally:
        server.stop()
    log = (tmp_path / "log").read_text()
    assert "WARNING" in log and "without TLS" in log


def test_loopback_addresses_and_the_config_rule():
    for host in ("127.0.0.1", "127.3.4.5", "::1", "localhost", "::ffff:127.0.0.1"):
        assert is_loopback(host), host
        ServerConfig(token=TOKEN, host=host)
    for host in ("0.0.0.0", "", "::", "10.1.2.3", "example.org"):
        assert not is_loopback(host), host
        with pytest.raises(UsageError, match="insecure_no_tls"):
            ServerConfig(token=TOKEN, host=host)
        ServerConfig(token=TOKEN, host=host, insecure_no_tls=True)
        ServerConfig(token=TOKEN, host=host, tls_cert="cert.pem")


def test_closing_a_tls_connection_never_steals_bytes_from_the_next_one(server_model_dir,
                                                                        certificate):
    # Regression: close() from the user's thread used to close the descriptor under the reader
    # thread; the next connection got the same descriptor number and the old reader's TLS
    # layer read its first 5 bytes. Closing now only shuts down; the reader closes.
    import cloche

    from tests.server.helpers import InProcessServer

    cert, key = certificate
    with InProcessServer(cloche.load(server_model_dir), token=TOKEN, tls_cert=str(cert),
                         tls_key=str(key)) as server:
        for _ in range(40):
            with connect(server.address, token=TOKEN, tls=cert) as model:
                assert model.ping(1) == 1
            with pytest.raises(ConnectionError, match="only accepts TLS"):
                connect(server.address, token=TOKEN, timeout=30)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620])
def test_a_token_file_others_can_read_is_refused(tmp_path, mode):
    token_file = tmp_path / "token"
    token_file.write_text(FILE_TOKEN)
    token_file.chmod(mode)
    with pytest.raises(UsageError, match="chmod 600"):
        cli.resolve_token(str(token_file), {})
    token_file.chmod(0o400)
    assert cli.resolve_token(str(token_file), {}) == (FILE_TOKEN, (), False)


def test_short_tokens_are_refused(tmp_path):
    with pytest.raises(UsageError, match="at least 16 characters"):
        ServerConfig(token="secret")
    ServerConfig(token="x" * 16)
    env = dict(os.environ, CLOCHE_TOKEN="short", PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "cloche", "serve", "--port", "0"], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "at least 16 characters" in done.stderr


def test_a_trickled_tls_handshake_is_cut_off_at_the_same_deadline(server_model_dir,
                                                                   certificate):
    # (the TLS part was bounded as a whole before too: this guards that it stays so)
    import select
    import ssl

    import cloche

    from tests.server.helpers import InProcessServer, raw_socket

    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing, server_hostname="localhost").do_handshake()
    client_hello = outgoing.read()  # a real ClientHello, a few hundred bytes
    cert, key = certificate
    with InProcessServer(cloche.load(server_model_dir), token=TOKEN, tls_cert=str(cert),
                         tls_key=str(key), handshake_timeout=1.5) as server:
        sock = raw_socket(server.address, timeout=30)
        sent, answer = 0, None
        try:
            for byte in client_hello:  # one byte every 0.2 s: each read is quick, the whole not
                sock.sendall(bytes([byte]))
                sent += 1
                if select.select([sock], [], [], 0.2)[0]:
                    answer = sock.recv(4096)
                    break
        except OSError:
            answer = b""
        finally:
            sock.close()
        assert answer == b"" and sent < len(client_hello)
