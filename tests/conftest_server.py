"""Helpers and fixtures for tests that run a real ``cloche serve`` subprocess on 127.0.0.1.

``tests/conftest.py`` (and the server/client test packages) import from here. The server is the
real command line (``python -m cloche serve --port 0``) serving a tiny GPT-2 with a real
byte-level BPE tokenizer, saved with ``save_pretrained`` in a temporary directory; the token
travels through ``$CLOCHE_TOKEN``; the test reads the machine-readable ``listening on
host:port`` line from the server's stdout.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from tests.threads import TORCH_THREADS

__all__ = [
    "CORPUS",
    "ServerProcess",
    "save_tiny_gpt2_with_tokenizer",
    "served",
    "server_model_dir",
    "server_token",
]

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
    "while True:\n    break\n",
    "the quick brown fox jumps over the lazy dog\n",
] * 4

REPO = pathlib.Path(__file__).resolve().parents[1]


def save_tiny_gpt2_with_tokenizer(directory: pathlib.Path, seed: int = 0) -> pathlib.Path:
    """A 2-layer GPT-2 (d_model 32) and a ~300-token byte-level BPE, saved for ``cloche.load``."""
    import transformers
    from cloche.default_model.tokenizer import save, train_tokenizer

    tok = train_tokenizer(CORPUS, vocab_size=300)
    save(tok, directory)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=tok.get_vocab_size(),
        bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return directory


class ServerProcess:
    """``python -m cloche serve`` in a subprocess; ``address`` once it listens."""

    def __init__(self, model_dir: pathlib.Path, token: str, *args: str,
                 startup_timeout: float = 120.0, log_path: pathlib.Path | None = None) -> None:
        threads = str(TORCH_THREADS)  # the test process runs at this count too (tests/threads.py)
        env = dict(os.environ, CLOCHE_TOKEN=token, OMP_NUM_THREADS=threads,
                   MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self.token = token
        self._log = (
            open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
            if log_path is not None else subprocess.DEVNULL
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloche", "serve", "--model", str(model_dir), "--port", "0",
             "--threads", threads, "--log-level", "WARNING", *args],
            stdout=subprocess.PIPE, stderr=self._log, env=env, cwd=str(REPO),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()  # None: the end of its stdout
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + startup_timeout
        self.address = ""
        while not self.address:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError("the server did not start listening in time") from None
            if line is None:  # the end of its stdout: it exited without listening
                self.stop()
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
            if line.startswith("listening on "):
                self.address = line.split()[-1]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    @property
    def host(self) -> str:
        return self.address.rpartition(":")[0]

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def remaining_output(self, timeout: float = 120.0) -> list[str]:
        """The stdout lines not read yet, up to its end (call once the process is exiting)."""
        lines = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            lines.append(line)
        return lines

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode


# The fixtures below may be imported by several conftest files (tests/conftest.py, the server and
# client test packages); pytest then sees several definitions, so the expensive objects are
# cached here and shared: one model directory and one server process per test session.
_SHARED: dict[str, object] = {}


@pytest.fixture(scope="session")
def server_model_dir(tmp_path_factory) -> pathlib.Path:
    if "dir" not in _SHARED:
        _SHARED["dir"] = save_tiny_gpt2_with_tokenizer(tmp_path_factory.mktemp("tiny-gpt2-served"))
    return _SHARED["dir"]  # type: ignore[return-value]


@pytest.fixture(scope="session")
def server_token() -> str:
    return _SHARED.setdefault("token", secrets.token_urlsafe(16))  # type: ignore[return-value]


@pytest.fixture(scope="session")
def served(server_model_dir, server_token, tmp_path_factory):
    """A running server, shared by the test session (starting one costs seconds of imports).

    Stopped (SIGTERM) when the test process exits. Tests that need other flags start their
    own :class:`ServerProcess`.
    """
    server = _SHARED.get("server")
    if not isinstance(server, ServerProcess) or not server.alive():
        log = tmp_path_factory.mktemp("server-log") / "server.log"
        server = ServerProcess(server_model_dir, server_token, log_path=log)
        _SHARED["server"] = server
        atexit.register(server.stop)
    return server


@pytest.fixture(scope="session")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 / localhost: (cert.pem, key.pem), made with the
    ``cryptography`` package (a test dependency), so no openssl binary is needed."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    directory = tmp_path_factory.mktemp("tls")
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    return cert_path, key_path
