"""Well-formed but wrong requests, sent below the facade: the server answers each with a cloche
error that names the problem (UsageError, or a legitimate error of the hierarchy), never with a
RemoteError wrapping TypeError/IndexError/AttributeError, and it keeps serving.

The facade validates what users pass, but a server cannot trust that a peer used the facade:
every request record is checked on the server (``Request.check``) before it runs.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from cloche.api import requests as rq
from cloche.client import connect
from cloche.errors import UsageError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.helpers import authenticated
from tests.server.wrong_requests import (
    FETCH_JUNK,
    FETCH_MANY_JUNK,
    LEGITIMATE,
    SAVED,
    wrong_request,
)

torch.set_num_threads(1)


@st.composite
def wrong_requests(draw):
    return wrong_request(
        lambda seq: draw(st.sampled_from(seq)),
        lambda names: draw(st.sets(st.sampled_from(names), min_size=1, max_size=len(names))))


_ids = itertools.count(1)


def ask(framed, op):
    rid = next(_ids)
    framed.send({"kind": "request", "id": rid, "op": op})
    while True:
        reply = framed.recv(allow_code=True)
        assert reply is not None, "the server closed the connection"
        if reply.get("id") == rid and reply["kind"] in ("result", "error"):
            return reply


@pytest.fixture(scope="module")
def framed(served):
    framed = authenticated(served.address, served.token)
    with connect(served.address, token=served.token) as model:  # a saved key to fetch
        model.run("def f():", probes={"embed": lambda ctx, x: ctx.save("key", x)},
                  save=SAVED)
    yield framed
    framed.close()


@settings(max_examples=int(os.environ.get("CLOCHE_FUZZ_EXAMPLES", "300")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(op=wrong_requests())
def test_wrong_requests_come_back_as_cloche_errors_that_name_the_problem(served, framed, op):
    try:
        reply = ask(framed, op)
    except UsageError:
        return  # the value cannot even be encoded: the client says so before sending
    if reply["kind"] == "error":
        error = reply["error"]
        assert error["type"] in LEGITIMATE, (
            f"{type(op).__name__}: {error['type']}: {error['message']}\n{error['traceback']}")
        assert not error["message"].startswith("malformed"), error["message"]  # a check bug
    assert served.alive()


def test_the_server_still_serves_after_the_wrong_requests(served):
    with connect(served.address, token=served.token) as model:
        assert model.ping("fine") == "fine"
        assert model.run("def f():").logits.shape[0] == 1


@pytest.mark.parametrize("args", FETCH_JUNK)
def test_wrong_fetches_are_usage_errors(served, framed, args):
    reply = ask(framed, rq.Context(name=SAVED, action="fetch", args=args))
    if reply["kind"] == "error":
        assert reply["error"]["type"] == "UsageError", reply["error"]["message"]


@pytest.mark.parametrize("args", FETCH_MANY_JUNK)
def test_wrong_fetches_of_several_keys_are_usage_errors(served, framed, args):
    reply = ask(framed, rq.Context(name=SAVED, action="fetch_many", args=args))
    assert reply["kind"] == "error"
    assert reply["error"]["type"] == "UsageError", reply["error"]["message"]
