"""Request records with wrong field values, built below the facade (as any peer can send them).

Shared by the hypothesis test (tests/server/test_request_validation.py) and the frame fuzzer
(benchmarks/fuzz_frames.py): ``wrong_request(pick, pick_fields)`` builds one record whose
chosen fields hold junk and whose other fields are right, so that one wrong field is reached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from cloche.api import requests as rq

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
    "return_loss": lambda: False,
    "micro_batches": lambda: 1, "options": lambda: {"max_new_tokens": 2, "do_sample": False,
                                                   "pad_token_id": 1},
    "seed": lambda: 3, "dataset": lambda: ["def f():\n", "x = 1\n"], "batch_size": lambda: 2,
    "limit": lambda: None, "fn": lambda: (lambda model, *a, **k: 1), "args": tuple,
    "kwargs": dict, "rank": lambda: None, "name": lambda: SAVED, "action": lambda: "keys",
    "point": lambda: "embed", "grad": lambda: False, "canonical": lambda: True,
    "index": lambda: None,
    "value": lambda: None,
    # run_dataset's long-run options; export stays None unless fuzzed, and then export_points
    # is empty (or junk), so that check() refuses it before anything is written
    "checkpoint_every": lambda: None, "resume": lambda: False, "export": lambda: None,
    "export_points": tuple, "export_dtype": lambda: "float16",
    "export_shard_tokens": lambda: 1 << 16,
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

#: arguments of a fetch of several keys that are well-formed and wrong
FETCH_MANY_JUNK = [
    (["key", "nokey"], "stack"), (["key"], "bogus"), ("key", "stack"), ([1, "key"], "list"),
    ({"key": 1}, "cat"), (None, None), ([["key"]], "stack"),
]

#: fields whose junk could write files on the server: only non-strings there
PATH_ACTIONS = ("persist", "restore")
READ_ACTIONS = ("keys", "fetch", "fetch_many", "state", "num_runs", "reducers", "result", "nbytes")


def field_names(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


REQUESTS = [rq.Run, rq.Generate, rq.RunDataset, rq.Call, rq.Context, rq.Owner, rq.Param,
            rq.ParamNames]


def wrong_request(pick: Callable[[Sequence[Any]], Any],
                  pick_fields: Callable[[list[str]], set[str]]) -> rq.Request[Any]:
    """One record: ``pick`` chooses from a sequence, ``pick_fields`` the fields to make wrong."""
    kind = pick(REQUESTS)
    names = field_names(kind)
    wrong = pick_fields(names)
    values = {}
    for name in names:
        if name in wrong:
            junk = pick(JUNK)
            values[name] = junk() if callable(junk) and not isinstance(junk, type) else junk
        else:
            values[name] = VALID[name]()
    if kind is rq.Context:
        if "action" not in wrong:
            values["action"] = pick(READ_ACTIONS)
        action = values["action"] if isinstance(values["action"], str) else None
        if action in PATH_ACTIONS:
            values["args"] = (3,)  # never a path: junk must not write files on the server
        elif action == "fetch":
            values["args"] = pick(FETCH_JUNK) if "args" in wrong else ("key", "stack", None)
        elif action == "fetch_many":
            values["args"] = pick(FETCH_MANY_JUNK) if "args" in wrong else (None, "stack")
    record = object.__new__(kind)  # no constructor in the way: exactly what a peer can send
    for name, value in values.items():
        object.__setattr__(record, name, value)
    return record
