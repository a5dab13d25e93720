"""``submit`` futures and ``cloche.Pool`` over several servers."""

from __future__ import annotations

import concurrent.futures

import cloche
import pytest
import torch
from cloche.client import Pool, connect
from cloche.client.executor import parse_address

from tests.server.helpers import InProcessServer


@pytest.fixture(scope="module")
def second_server(server_model_dir):
    """A second server (in this process) with different weights: another 'checkpoint'."""
    from tests.conftest_server import save_tiny_gpt2_with_tokenizer

    directory = server_model_dir.parent / "second-checkpoint"
    directory.mkdir(exist_ok=True)
    save_tiny_gpt2_with_tokenizer(directory, seed=1)
    with InProcessServer(cloche.load(directory)) as server:
        yield server


def test_submit_returns_futures(served):
    with connect(served.address, token=served.token) as model:
        futures = [model.submit("run", text) for text in ["a", "bb", "def f():"]]
        results = [f.result(timeout=60) for f in futures]
        assert [r.tokens.shape[1] for r in results] == [
            model.tokenize(t).shape[0] for t in ["a", "bb", "def f():"]]
        assert model.submit("param", "embed.W_E").result().shape[1] == model.d_model
        done = model.submit("ping", 3)
        assert done.result() == 3 and not done.cancel()
        with pytest.raises(cloche.UsageError):
            model.submit("__init__")


def test_cancelled_future_raises_cancelled_error(served):
    with connect(served.address, token=served.token) as model:
        future = model.submit("run_dataset", ["x y z"] * 5000, batch_size=1)
        assert future.cancel()
        with pytest.raises(concurrent.futures.CancelledError):
            future.result()
        assert model.ping("usable") == "usable"


def test_pool_fans_out_and_gathers_in_order(served, second_server):
    addresses = [served.address, second_server.address]
    with Pool(addresses, token=[served.token, second_server.token]) as pool:
        layers = pool.call(lambda m: m.n_layers)
        assert layers == [2, 2]
        runs = pool.apply("run", "def add(a, b):")
        assert not torch.equal(runs[0].logits, runs[1].logits)  # different checkpoints
        with connect(second_server.address, token=second_server.token) as direct:
            assert torch.equal(runs[1].logits, direct.run("def add(a, b):").logits)
        squares = pool.map(lambda m, i: (i * i, m.name), range(5))
        assert [s for s, _ in squares] == [0, 1, 4, 9, 16]
        with pytest.raises(cloche.CallError):
            pool.call(lambda m: 1 / 0)


def test_addresses():
    assert parse_address("localhost:7450") == ("localhost", 7450)
    assert parse_address("[::1]:80") == ("::1", 80)
    assert parse_address(("h", 1)) == ("h", 1)
    for bad in ["nohost", ":12", "h:port", 5]:
        with pytest.raises(cloche.UsageError):
            parse_address(bad)
    with pytest.raises(cloche.UsageError):
        connect("127.0.0.1:1", token="")
    with pytest.raises(cloche.errors.ConnectionError):
        connect("127.0.0.1:1", token="t", timeout=5)


def test_connect_reads_the_address_and_token_from_the_environment(served, monkeypatch):
    monkeypatch.setenv("CLOCHE_ADDRESS", served.address)
    monkeypatch.setenv("CLOCHE_TOKEN", served.token)
    with cloche.connect() as model:
        assert model.ping("from the environment") == "from the environment"
    monkeypatch.delenv("CLOCHE_TOKEN")
    with pytest.raises(cloche.UsageError, match="CLOCHE_TOKEN"):
        cloche.connect()
    monkeypatch.delenv("CLOCHE_ADDRESS")
    with pytest.raises(cloche.UsageError, match="CLOCHE_ADDRESS"):
        cloche.connect(token=served.token)


def test_a_pool_takes_tls_settings_per_server(served, certificate, server_model_dir):
    from tests.server.helpers import InProcessServer

    cert, key = certificate
    with InProcessServer(cloche.load(server_model_dir), tls_cert=str(cert),
                         tls_key=str(key)) as tls_server, \
            Pool([tls_server.address, served.address], token=[tls_server.token, served.token],
                 tls=[cert, None]) as pool:
        assert pool.apply("ping", "both") == ["both", "both"]
    with pytest.raises(cloche.UsageError, match="2 TLS settings for 1 addresses"):
        Pool([served.address], token=served.token, tls=[cert, None])
