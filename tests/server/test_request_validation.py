"""Well-formed but wrong requests, sent below the facade: the server answers each with a cloche
error that names the problem (UsageError, or a legitimate error of the hierarchy), never with a
RemoteError wrapping TypeError/IndexError/AttributeError, and it keeps serving.

The facade validates what users pass, but a server cannot trust that a peer used the facade:
every request record is checked on the server (``Request.check``) before it runs.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloche.api import requests as rq
from cloche.client import connect
from cloche.errors import UsageError
from tests.server.helpers import authenticated

torch.set_num_threads(1)

#: what a wrong request may legitimately come back as
LEGITIMATE = {"UsageError", "UnknownProbePoint", "ProbeError", "ResourceLimit", "Cancelled"}


SAVED = "shared/fuzzed-setup"  # shared: visible to the fuzzing connection's session too


def ids():
    return torch.tensor([[5, 6, 7]])


def mask():
    return torch.ones(1, 3, dtype=torch.long)


def keep_nothing(ctx, x):
    return None


def plan():
    return {"embed": [lambda ctx, x: None]}


#: values that are right for each field (so that one wrong field is reached)
VALID = {
    "ids": ids, "mask": mask, "forward": plan, "backward_probes": dict,
    "save": lambda: "fuzzed", "backward": lambda: None, "return_logits": lambda: True,
    "micro_batches": lambda: 1, "options": lambda: {"max_new_tokens": 2, "do_sample": False,
                                                   "pad_token_id": 1},
    "seed": lambda: 3, "dataset": lambda: ["def f():\n", "x = 1\n"], "batch_size": lambda: 2,
    "limit": lambda: None, "fn": lambda: (lambda model, *a, **k: 1), "args": tuple,
    "kwargs": dict, "rank": lambda: None, "name": lambda: SAVED, "action": lambda: "keys",
    "point": lambda: "embed", "grad": lambda: False, "canonical": lambda: True,
    "value": lambda: None,
}

JUNK = [
    None, True, False, 0, -1, 7, 2**40, -(2**63), 1.5, math.nan, "", "x", "embed",
    "layers.0.mlp.post", "stack", "fetch", "result", b"\x00", [], [1, "a"], [[1, 2]], {},
    {"a": 1}, {1: 2}, ("a", 1), slice(1, 2), Ellipsis, torch.float32,
    lambda: torch.zeros(()), lambda: torch.zeros(3), lambda: torch.rand(1, 3),
    lambda: torch.full((1, 3), 10**6), lambda: torch.full((1, 3), -5),
    lambda: torch.zeros(0, 3, dtype=torch.long), lambda: torch.zeros(1, 0, dtype=torch.long),
    lambda: torch.ones(1, 3, dtype=torch.bool), lambda: torch.ones(1, 200, dtype=torch.long),
    lambda: torch.ones(2, 3, 4, dtype=torch.long), lambda: torch.ones(1, 4, dtype=torch.long),
    lambda: np.ones((1, 3), dtype=np.int64), lambda: torch.full((1, 3), 2, dtype=torch.long),
    lambda: {"embed": [1]}, lambda: {"nope": [keep_nothing]}, lambda: {"embed": keep_nothing},
    lambda: {3: [keep_nothing]}, lambda: {"embed": [abs]}, lambda: {"embed": "x"},
    lambda: {"max_new_tokens": 10**6}, lambda: {"max_new_tokens": 0},
    lambda: {"bogus_option": 1}, lambda: {"max_new_tokens": 2, "temperature": -1.0},
    lambda: {"max_new_tokens": 2, "pad_token_id": 10**6}, lambda: {"max_new_tokens": "2"},
    lambda: ["key"], lambda: ("key", "stack"), lambda: ("key", "bogus", None),
    lambda: ("key", "stack", "ops"), lambda: (1, "stack", None), lambda: (None,),
    lambda: ["not", "texts", 3], list,
]

#: arguments of a fetch that are well-formed and wrong (ops are applied where the data is)
FETCH_JUNK = [
    ("key", "stack", [["index", [{"s": [0, 1, 1]}]]]), ("key", "stack", [["index", [10**9]]]),
    ("key", "stack", [["index", [{"l": [99]}]]]), ("key", "stack", [["index", [0] * 6]]),
    ("key", "stack", [["index", [{"s": [0, 1, 0]}]]]), ("key", "stack", [["to", "nope"]]),
    ("key", "stack", [["to", "complex64"], ["index", [{"e": 1}, 10**9]]]),
    ("key", "stack", [["spin", 1]]), ("key", "stack", [[]]), ("key", "cat", [["index", [5]]]),
    ("key", "list", [["index", [0]]]), ("nokey", "stack", None), ("key", "bogus", None),
    ("key", "stack", [["index", [{"n": None}, {"b": True}, -(2**62)]]]),
]

#: fields whose junk could write files on the server: only non-strings there
PATH_ACTIONS = ("persist", "restore")
READ_ACTIONS = ("keys", "fetch", "state", "num_runs", "reducers", "result", "nbytes")


def field_names(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


REQUESTS = [rq.Run, rq.Generate, rq.RunDataset, rq.Call, rq.Context, rq.Owner, rq.Param,
            rq.ParamNames]


@st.composite
def wrong_requests(draw):
    kind = draw(st.sampled_from(REQUESTS))
    names = field_names(kind)
    wrong = draw(st.sets(st.sampled_from(names), min_size=1, max_size=len(names)))
    values = {}
    for name in names:
        if name in wrong:
            junk = draw(st.sampled_from(JUNK))
            values[name] = junk() if callable(junk) and not isinstance(junk, type) else junk
        else:
            values[name] = VALID[name]()
    if kind is rq.Context:
        if "action" not in wrong:
            values["action"] = draw(st.sampled_from(READ_ACTIONS))
        action = values["action"] if isinstance(values["action"], str) else None
        if action in PATH_ACTIONS:
            values["args"] = (3,)  # never a path: junk must not write files on the server
        elif action == "fetch":
            values["args"] = (draw(st.sampled_from(FETCH_JUNK)) if "args" in wrong
                              else ("key", "stack", None))
    record = object.__new__(kind)  # no constructor in the way: exactly what a peer can send
    for name, value in values.items():
        object.__setattr__(record, name, value)
    return record


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
