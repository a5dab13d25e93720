"""Soak and faults: 16 clients on a real ``cloche serve`` for minutes, a kill -9, a lost rank.

    python benchmarks/soak.py [--minutes 10] [--clients 16] [--json PATH] [--model DIR]

What it does. One ``cloche serve --state-dir DIR`` subprocess on 127.0.0.1 (the shipped default
model unless ``--model``; token through ``$CLOCHE_TOKEN``) serves ``--clients`` client threads,
each with its own ``cloche.connect(...)`` session, for ``--minutes``. One client does nothing but
``model.ping()``, back to back, to time a trivial request *under load*. The others draw from a
mixed workload at random, and check every answer they can:

- run: ``model.run(text, probes=..., save="runs")``, the probe doing ``ctx.save`` and feeding the
  ``Mean`` and ``TopK(5)`` reducers; the logits must equal the first answer for that text;
- read: ``handle.keys()``, ``handle["x_l0"][:, -1].fetch()``, ``handle.result(...)``,
  ``handle.state``: every run the server acknowledged must be there, once; ``handle.clear()``
  now and then;
- generate: greedy ``model.generate(prompt, 8, probes=..., save="gen")``, same tokens every time;
- param / call: ``model.param("layers.0.attn.W_Q")`` and ``model.call(fn)`` (module-level
  functions: a weight's sum, and the session's own run count as shipped code sees it);
- dataset: ``model.run_dataset(texts, probes={...: lambda c, x: c.reduce(...)}, batch_size=4)``;
- cancel: ``model.submit("run_dataset", ...)``, ``future.cancel()`` at its first progress event
  (from the event callback or from the client's thread); afterwards the context it was writing
  must be untouched -- or, if the cancel came after the last batch, hold the whole run: never a
  part of it;
- disconnect: drop the connection while a request is in flight (``socket.shutdown`` under the
  client, or ``model.close()``); the next request must reconnect to the same session;
- scratch: save into a scratch context, ``handle.clear()``, check it is empty.

Two fault phases, each once:

- at 1/3 of the duration, the server is killed (``kill -9``) and restarted with the same
  ``--state-dir`` and port. Just before, every client snapshots its committed save contexts
  (``num_runs``, a checksum of every fetched entry and reducer statistic, ``state``), then goes
  on working until the kill. After the restart every client -- the same objects, which
  reconnect by themselves -- checks that nothing committed was lost: every run the server
  acknowledged is there, the snapshot's entries are a prefix of what is there now, reducers and
  state are equal when no run was added since. ``SessionLost`` or any mismatch is *lost data*.
- at 2/3, a sharded server (``--world-size 2 --state-dir DIR2``) with two more clients of its
  own: rank 1's process (a child of the server) is killed with ``kill -9``; the clients get
  ``WorkerLost`` and the server exits with code 3; it is restarted with the same state dir and
  port, and the clients check their contexts the same way. (Their probe has no ``TopK``: a plain
  run on a sharded model has no example ids for it, benchmarks/soak_repros/sharded_topk.py. A
  write that failed with ``WorkerLost`` is an unknown outcome, like a lost connection; if it
  turns out committed, that is reported: soak_repros/sharded_workerlost_commit.py.)

A server that stops doing model work is a finding too: when no client finishes any model work for
``--hang-s`` seconds (45) outside a fault, the server is declared hung, sent SIGABRT (it runs
with ``PYTHONFAULTHANDLER=1``, so every thread's stack goes to its log; the worker thread's is
copied into the report), restarted with the same state dir and port, and every client checks
its contexts again (each acknowledged run still there) -- the soak goes on.

Each client's tokenizer is loaded before the load starts, one client at a time: the first
``model.tokenizer`` of many threads at once fails (benchmarks/soak_repros/
tokenizer_import_race.py), and that is a start-up bug, not what a soak is for.

Errors are counted by operation and type; the expected ones -- ``Cancelled`` for cancels,
``ConnectionError`` for a deliberate disconnect or during a restart, ``WorkerLost`` during the
sharded fault -- apart from the rest. A request whose connection was lost may or may not have
committed: the client then waits for its earlier work to finish (a queued ``model.call`` is a
fence: the server runs one session's model work in order) and accepts either outcome, never a
part of it. The server's RSS and thread count are sampled every second from ``/proc``.

Why: the unit tests take each of these paths once, alone, in seconds. A soak takes them all at
once, for minutes, with 16 sessions in the fair queue -- where hangs, lost commits, leaked
threads and slow memory growth show up.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import pathlib
import queue
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's cloche, whatever is installed

import cloche  # noqa: E402 - after the path fix above
from cloche import errors as cerr  # noqa: E402

# ----------------------------------------------------------------------------- workload data

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\nprint(os.getcwd(), sys.argv)\n",
    "while True:\n    break\n",
    "with open(path) as f:\n    data = f.read()\n",
    "try:\n    import json\nexcept ImportError:\n    json = None\n",
    "def __repr__(self):\n    return f'{type(self).__name__}()'\n",
    "if __name__ == '__main__':\n    main()\n",
    "return [x * 2 for x in items if x]\n",
    "raise ValueError('bad value: %r' % (value,))\n",
    "self.assertEqual(result, expected)\n",
    "from collections import defaultdict\ncounts = defaultdict(int)\n",
    "async def fetch(url):\n    return await session.get(url)\n",
    "lines = text.splitlines()\nfor line in lines:\n    line = line.strip()\n",
    "@property\ndef name(self):\n    return self._name\n",
]
PROMPTS = ["def f(", "import ", "class A:\n    def ", "for x in ", "return self."]
#: a dataset long enough that a cancel lands in the middle (16 batches of 4)
LONG_DATASET = [TEXTS[i % len(TEXTS)] for i in range(64)]
WEIGHT = "layers.0.attn.W_Q"


# ----------------------------------------------------------------------------- shipped code
# Module-level functions: cloudpickle ships them by value (this file runs as __main__).


def keep(ctx, x):
    """Save the last position, feed Mean and TopK, count runs in ``ctx.state``."""
    tag = f"l{ctx.layer}"
    ctx.save(f"x_{tag}", x[:, -1])
    ctx.reduce(f"mean_{tag}", x, cloche.Mean())
    ctx.reduce(f"top_{tag}", x, cloche.TopK(5))
    ctx.state[f"runs_{tag}"] = ctx.state.get(f"runs_{tag}", 0) + 1


def keep_sharded(ctx, x):
    """``keep`` without TopK: on a sharded model a plain run has no example ids for it."""
    tag = f"l{ctx.layer}"
    ctx.save(f"x_{tag}", x[:, -1])
    ctx.reduce(f"mean_{tag}", x, cloche.Mean())
    ctx.state[f"runs_{tag}"] = ctx.state.get(f"runs_{tag}", 0) + 1


def keep_generate(ctx, x):  # generation has no example ids, so no TopK here
    ctx.save("x", x[:, -1])
    ctx.reduce("mean", x, cloche.Mean())


def scratch_save(ctx, x):
    ctx.save("x", x)


def slow_mean(ctx, x):
    time.sleep(0.01)  # 16 batches take >= 160 ms: a cancel at the first progress event lands
    ctx.reduce("m", x, cloche.Mean())


def weight_sum(model, name):
    return float(model.param(name).double().sum())


def runs_seen(model, name):
    return model.save_context(name).num_runs


def fence(model):
    """Queued behind the session's earlier model work: when it answers, that work is done."""
    return None


def server_threads(model):
    """Every thread of the server process: name and the innermost frames of its stack."""
    import sys as _sys
    import threading as _threading
    import traceback as _traceback

    frames = _sys._current_frames()
    out = []
    for thread in _threading.enumerate():
        frame = frames.get(thread.ident)
        stack = _traceback.extract_stack(frame)[-3:] if frame is not None else []
        out.append((thread.name, [f"{f.name} ({f.filename.rsplit('/', 1)[-1]}:{f.lineno})"
                                  for f in stack]))
    return out


# ----------------------------------------------------------------------------- processes


def proc_status(pid: int) -> dict[str, int] | None:
    """VmRSS, VmHWM (kB) and Threads of a live process, None once it is gone (or a zombie)."""
    try:
        text = pathlib.Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out if "VmRSS" in out else None


def children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc, like ``ps --ppid``)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    return proc_status(pid) is not None


class Server:
    """``python -m cloche serve ...`` in a subprocess; ``address`` once it listens."""

    def __init__(self, label: str, token: str, workdir: pathlib.Path, args: list[str],
                 model: str | None) -> None:
        self.label = label
        self.log_path = workdir / f"{label}.log"
        # PYTHONFAULTHANDLER: a SIGABRT (sent only to a server that hangs) dumps every
        # thread's stack to its log before it dies
        env = dict(os.environ, CLOCHE_TOKEN=token, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, "-m", "cloche", "serve", "--log-level", "WARNING", *args]
        if model is not None:
            cmd += ["--model", model]
        self.command = " ".join(cmd[1:])
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - written until the process ends
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, env=env,
                                     cwd=str(ROOT))
        self.pid = self.proc.pid
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.address = ""
        self.startup_s: float | None = None
        self.killed_by_us: str | None = None

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put("")

    def wait_listening(self, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while not self.address:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"{self.label} did not listen within {timeout:.0f} s") from None
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                self.startup_s = time.monotonic() - self.started
            elif not line and self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode} before"
                                   f" listening (log: {self.log_path})")
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2])

    def kill9(self) -> None:
        self.killed_by_us = "SIGKILL"
        self.proc.kill()
        self.proc.wait()

    def abort(self) -> int | None:
        """SIGABRT: with PYTHONFAULTHANDLER=1 the process writes all stacks to its log."""
        self.killed_by_us = "SIGABRT"
        self.proc.send_signal(signal.SIGABRT)
        if self.wait_exit(30) is None:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def stack_of(self, function: str, lines: int = 16) -> list[str]:
        """From the faulthandler dump in the log: the stack of the thread running
        ``function`` (most recent call first)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        dump = text.rpartition("Fatal Python error")[2]
        for block in dump.split("\n\n"):
            if f" in {function}" in block:
                return [line.strip() for line in block.splitlines()][:lines]
        return []

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 60.0) -> tuple[int | None, float]:
        """SIGTERM, wait; SIGKILL if it does not exit. Returns (exit status, seconds taken)."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self.wait_exit(timeout) is None:
                self.killed_by_us = f"SIGKILL after SIGTERM was ignored for {timeout:.0f} s"
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, time.monotonic() - started

    def close_log(self) -> None:
        self._log.close()

    def log_problems(self, limit: int = 12) -> dict[str, Any]:
        """Counts of WARNING/ERROR/Traceback lines in the server's stderr, and the first few."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return {}
        hits = [line for line in lines
                if any(w in line for w in (" WARNING ", " ERROR ", "Traceback", "cloche serve:",
                                           "cloche rank"))]
        return {"lines": len(lines), "problem_lines": len(hits), "first": hits[:limit]}


class Monitor(threading.Thread):
    """Samples VmRSS, VmHWM and Threads of the watched processes every ``interval`` seconds."""

    def __init__(self, t0: float, interval: float = 1.0) -> None:
        super().__init__(name="soak-monitor", daemon=True)
        self.t0 = t0
        self.interval = interval
        self.watching: dict[str, int] = {}
        self.samples: dict[str, list[tuple[float, int, int, int]]] = defaultdict(list)
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    def watch(self, label: str, pid: int) -> None:
        with self.lock:
            self.watching[label] = pid
        self.sample(label, pid)

    def sample(self, label: str, pid: int) -> dict[str, int] | None:
        status = proc_status(pid)
        if status is not None:
            with self.lock:
                self.samples[label].append((time.monotonic() - self.t0, status["VmRSS"],
                                            status.get("VmHWM", 0), status.get("Threads", 0)))
        return status

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            with self.lock:
                watching = dict(self.watching)
            for label, pid in watching.items():
                if self.sample(label, pid) is None:
                    with self.lock:
                        self.watching.pop(label, None)


# ----------------------------------------------------------------------------- bookkeeping


class CheckFailed(Exception):
    """A wrong answer (not an exception from cloche)."""


class LostData(Exception):
    """Committed data that is gone or changed."""


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Stats:
    def __init__(self, t0: float) -> None:
        self.t0 = t0
        self.lock = threading.Lock()
        self.ok: Counter[str] = Counter()
        self.latency: dict[str, list[tuple[float, float]]] = defaultdict(list)  # (start, s)
        self.errors: Counter[tuple[str, str, bool, str]] = Counter()
        self.error_samples: dict[tuple[str, str, bool, str], dict[str, Any]] = {}
        self.lost: list[dict[str, Any]] = []
        self.notes: Counter[str] = Counter()
        self.last_heavy = time.monotonic()  # when a main client last finished model work

    def done(self, kind: str, start: float, seconds: float) -> None:
        with self.lock:
            self.ok[kind] += 1
            self.latency[kind].append((start, seconds))
            if kind in HEAVY_KINDS:
                self.last_heavy = time.monotonic()

    def error(self, kind: str, exc: BaseException | str, expected: bool, why: str,
              client: str) -> None:
        name = exc if isinstance(exc, str) else type(exc).__name__
        key = (kind, name, expected, why)
        with self.lock:
            self.errors[key] += 1
            if key not in self.error_samples:
                self.error_samples[key] = {
                    "client": client, "t": round(time.monotonic() - self.t0, 1),
                    "message": str(exc)[:500],
                    "traceback": "" if expected or isinstance(exc, str) else "".join(
                        traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:],
                }

    def lost_data(self, client: str, what: str, detail: str) -> None:
        with self.lock:
            self.lost.append({"client": client, "what": what, "detail": detail[:1000],
                              "t": round(time.monotonic() - self.t0, 1)})

    def note(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.notes[what] += n


#: operations of the main clients that need the model's worker (its queue), not just a reply
HEAVY_KINDS = frozenset({"run", "generate", "call", "dataset", "cancel", "disconnect",
                         "scratch"})


class Windows:
    """Fault windows per target ("main", "shard"): errors of connection loss inside are expected."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[list[Any]] = []

    def open(self, target: str, name: str) -> int:
        with self.lock:
            self.spans.append([target, name, time.monotonic(), None])
            return len(self.spans) - 1

    def close(self, index: int) -> None:
        with self.lock:
            self.spans[index][3] = time.monotonic()

    def overlapping(self, target: str, start: float, end: float) -> str | None:
        with self.lock:
            for span_target, name, a, b in self.spans:
                if span_target == target and a <= end and (b is None or start <= b):
                    return name
        return None


class Gate:
    """Pauses every registered client between two operations to run a task (snapshot, verify).

    ``run`` hands ``task`` to every client and waits until each has run it; the clients then
    wait until ``release``. A client stuck in an operation is reported, not waited for forever.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.members: set[str] = set()
        self.task: Callable[[Client], Any] | None = None
        self.generation = 0
        self.results: dict[str, Any] = {}
        self.frozen = False  # between a snapshot and its check: tracked contexts are not cleared

    def register(self, name: str) -> None:
        with self.cond:
            self.members.add(name)

    def unregister(self, name: str) -> None:
        with self.cond:
            self.members.discard(name)
            self.cond.notify_all()

    def run(self, task: Callable[[Client], Any], timeout: float) -> tuple[dict[str, Any],
                                                                           set[str]]:
        with self.cond:
            self.generation += 1
            self.task = task
            self.results = {}
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.members <= set(self.results), timeout)
            return dict(self.results), self.members - set(self.results)

    def release(self) -> None:
        with self.cond:
            self.task = None
            self.cond.notify_all()

    def check(self, client: Client) -> None:
        with self.cond:
            if self.task is None or client.gate_seen == self.generation:
                return
            task, generation = self.task, self.generation
        try:
            result: Any = task(client)
        except Exception as exc:  # noqa: BLE001 - reported by whoever runs the gate
            result = exc
        with self.cond:
            client.gate_seen = generation
            self.results[client.label] = result
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.task is None or self.generation != generation)


def digest(t: torch.Tensor) -> str:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha1(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def snapshot(model: cloche.Model, name: str) -> dict[str, Any]:
    """What a save context holds: num_runs, a digest per entry and per reducer statistic, state."""
    handle = model.save_context(name)
    entries = {key: [digest(e) for e in handle.fetch(key, "list")] for key in sorted(handle.keys())}
    reducers = {}
    for reducer in sorted(handle.reducers()):
        reducers[reducer] = {stat: digest(v) if isinstance(v, torch.Tensor) else repr(v)
                             for stat, v in sorted(handle.result(reducer).items())}
    return {"num_runs": handle.num_runs, "entries": entries, "reducers": reducers,
            "state": handle.state}


def compare(before: dict[str, Any], now: dict[str, Any], low: int, high: int) -> list[str]:
    """What is wrong with ``now`` given the snapshot ``before`` and acknowledged runs in
    [low, high] (high > low when a request's outcome is unknown)."""
    problems = []
    n = now["num_runs"]
    if n < low:
        problems.append(f"num_runs {n} < {low} acknowledged by the server")
    if n > high:
        problems.append(f"num_runs {n} > {high} (more runs than were ever sent)")
    if n < before["num_runs"]:
        problems.append(f"num_runs {n} < {before['num_runs']} at the snapshot")
    for key, digests in before["entries"].items():
        got = now["entries"].get(key, [])
        if got[:len(digests)] != digests:
            changed = sum(1 for a, b in zip(digests, got, strict=False) if a != b)
            missing = changed + max(0, len(digests) - len(got))
            problems.append(f"entries of {key!r}: {missing} of the {len(digests)} in the"
                            f" snapshot are missing or changed ({len(got)} now)")
    if n == before["num_runs"]:
        if now["reducers"] != before["reducers"]:
            problems.append("reducer statistics changed though no run was added")
        if now["state"] != before["state"]:
            problems.append(f"state changed though no run was added: {before['state']} ->"
                            f" {now['state']}")
    for key, value in now["state"].items():
        if key.startswith("runs_") and value != n:
            problems.append(f"state[{key!r}] = {value} but num_runs = {n}")
    return problems


@dataclass
class Tracked:
    """A save context this client writes, and what it knows the server committed."""

    name: str
    expected: int = 0  # runs the server acknowledged (since the last clear)
    pending: int = 0  # runs of requests whose outcome is unknown (connection or rank lost)
    pending_after: set[str] = field(default_factory=set)  # the errors that left them unknown
    snap: dict[str, Any] | None = None
    checked: int = field(default=0)


# ----------------------------------------------------------------------------- clients


class Client(threading.Thread):
    """One session doing a random mix of operations until ``stop`` is set."""

    def __init__(self, name: str, target: str, model: cloche.Model, mix: dict[str, int],
                 points: list[str], probe: Callable[..., Any], seed: int, run: Run) -> None:
        super().__init__(name=f"soak-{name}", daemon=True)
        self.name_ = name
        self.target = target
        self.model = model
        self.session0 = model.session
        self.rng = random.Random(seed)
        self.kinds = list(mix)
        self.weights = [mix[k] for k in self.kinds]
        self.points = points
        self.probe = probe
        self.r = run
        self.stats = run.stats
        self.gate = run.gates[target]
        self.stop = run.stops[target]
        self.gate_seen = 0
        self.tracked = {"runs": Tracked("runs"), "gen": Tracked("gen"), "ds": Tracked("ds")}
        self.ref_logits: dict[str, torch.Tensor] = {}
        self.ref_tokens: dict[str, list[int]] = {}
        self.ref_weight: torch.Tensor | None = None
        self.ref_sum: float | None = None
        self.finished = threading.Event()

    @property
    def label(self) -> str:  # Thread.name is taken; keep the short one for reports
        return self.name_

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.gate.check(self)
                if self.stop.is_set():
                    break
                kind = self.rng.choices(self.kinds, self.weights)[0]
                name = kind if self.target == "main" else f"sharded {kind}"
                if not self.timed(name, getattr(self, f"op_{kind}")):
                    time.sleep(0.05)  # no hot loop on a server that is down
        finally:
            self.finished.set()
            self.gate.unregister(self.label)

    def timed(self, kind: str, fn: Callable[[], Any]) -> bool:
        start = time.monotonic()
        try:
            fn()
        except LostData as exc:
            self.stats.lost_data(self.label, kind, str(exc))
            self.stats.error(kind, "LostData", False, "lost data", self.label)
        except CheckFailed as exc:
            self.stats.error(kind, "WrongResult", False, str(exc)[:120], self.label)
        except BaseException as exc:  # noqa: BLE001 - every failure is counted
            expected, why = self.classify(kind, exc, start, time.monotonic())
            self.stats.error(kind, exc, expected, why, self.label)
            if isinstance(exc, cerr.SessionLost):
                self.stats.lost_data(self.label, kind, f"SessionLost: {exc}")
        else:
            self.stats.done(kind, start, time.monotonic() - start)
            return True
        return False

    def classify(self, kind: str, exc: BaseException, start: float, end: float
                 ) -> tuple[bool, str]:
        if isinstance(exc, cerr.SessionLost):
            return False, "session lost"
        window = self.r.windows.overlapping(self.target, start, end)
        if (isinstance(exc, cerr.ConnectionError) and not isinstance(exc, cerr.AuthError)
                and window is not None):
            return True, f"during {window}"
        if isinstance(exc, cerr.WorkerLost) and window == "rank 1 lost":
            return True, f"during {window}"
        if isinstance(exc, cerr.Cancelled):
            return False, "Cancelled, though this client cancelled nothing"
        return False, "unexpected"

    # ------------------------------------------------------------------ tracked writes
    def write(self, tracked: Tracked, delta: int, fn: Callable[[], Any]) -> Any:
        if tracked.pending:
            self.resync(tracked)
        try:
            value = fn()
        except cerr.SessionLost:
            raise
        except (cerr.ConnectionError, cerr.WorkerLost) as exc:
            tracked.pending += delta  # sent, and maybe committed: we cannot know yet
            tracked.pending_after.add(type(exc).__name__)
            raise
        tracked.expected += delta  # acknowledged: committed
        return value

    def settle(self, tracked: Tracked, n: int) -> None:
        """The server holds ``n`` runs: account for the unknown outcomes (checked by caller)."""
        if tracked.pending:
            committed = n > tracked.expected
            self.stats.note("unknown outcomes resolved: committed" if committed
                            else "unknown outcomes resolved: not committed")
            if committed and "WorkerLost" in tracked.pending_after:
                self.stats.error("resync", "CommittedDespiteWorkerLost", False,
                                 "a run that failed with WorkerLost is committed", self.label)
        tracked.expected, tracked.pending = n, 0
        tracked.pending_after.clear()

    def resync(self, tracked: Tracked) -> None:
        """After an unknown outcome: wait for the session's earlier work, accept either outcome."""
        self.model.call(fence)
        n = self.model.save_context(tracked.name).num_runs
        low, high = tracked.expected, tracked.expected + tracked.pending
        if n < low:
            raise LostData(f"{tracked.name}: num_runs {n} < {low} acknowledged")
        if n > high:
            raise LostData(f"{tracked.name}: num_runs {n} > {high} (more than ever sent)")
        self.settle(tracked, n)

    # ------------------------------------------------------------------ operations
    def op_run(self) -> None:
        text = self.rng.choice(TEXTS)
        probes = dict.fromkeys(self.points, self.probe)
        result = self.write(self.tracked["runs"], 1,
                            lambda: self.model.run(text, probes=probes, save="runs"))
        last = result.logits[0, -1]
        ref = self.ref_logits.setdefault(text, last.clone())
        if not torch.allclose(last, ref, atol=1e-5, rtol=0):
            raise CheckFailed(f"logits of {text[:20]!r} changed by"
                              f" {(last - ref).abs().max().item():.3g}")

    def op_read(self) -> None:
        tracked = self.tracked["runs"]
        handle = self.model.save_context("runs")
        keys = handle.keys()
        n = handle.num_runs
        if tracked.pending == 0 and n != tracked.expected:
            raise LostData(f"runs: num_runs {n}, acknowledged {tracked.expected}")
        x_keys = [k for k in keys if k.startswith("x_")]
        if n and len(x_keys) != len(self.points):
            raise LostData(f"runs: keys {keys} after {n} runs")
        for key in x_keys:
            last = handle[key][:, -1].fetch()  # (entries, d_model): the slice is made remotely
            if last.shape[0] != n:
                raise LostData(f"runs[{key!r}]: {last.shape[0]} entries after {n} runs")
            layer = key.removeprefix("x_")
            mean = handle.result(f"mean_{layer}")
            if mean["mean"].shape != last.shape[1:]:
                raise CheckFailed(f"mean_{layer} has shape {tuple(mean['mean'].shape)}")
            if self.probe is keep:
                top = handle.result(f"top_{layer}")
                if top["values"].shape[0] != min(5, int(top["count"])):
                    raise CheckFailed(f"top_{layer} has shape {tuple(top['values'].shape)}")
        state = handle.state
        for key, value in state.items():
            if value != n:
                raise LostData(f"runs: state[{key!r}] = {value} after {n} runs")
        if tracked.expected >= 40 and tracked.pending == 0 and not self.gate.frozen:
            handle.clear()
            tracked.expected = 0
            if handle.keys() or handle.num_runs:
                raise CheckFailed("runs: not empty after clear()")

    def op_generate(self) -> None:
        prompt = self.rng.choice(PROMPTS)
        tracked = self.tracked["gen"]
        out = self.write(tracked, 1, lambda: self.model.generate(
            prompt, 8, probes={self.points[-1]: keep_generate}, save="gen"))
        tokens = out.tokens.reshape(-1).tolist()
        ref = self.ref_tokens.setdefault(prompt, tokens)
        if tokens != ref:
            raise CheckFailed(f"greedy generation of {prompt!r} changed")
        if tracked.expected >= 40 and not tracked.pending and not self.gate.frozen:
            self.model.save_context("gen").clear()
            tracked.expected = 0

    def op_param(self) -> None:
        weight = self.model.param(WEIGHT)
        if self.ref_weight is None:
            self.ref_weight = weight
        elif not torch.equal(weight, self.ref_weight):
            raise CheckFailed(f"{WEIGHT} changed")

    def op_call(self) -> None:
        if self.rng.random() < 0.5:
            value = self.model.call(weight_sum, WEIGHT)
            if self.ref_sum is None:
                self.ref_sum = value
            elif value != self.ref_sum:
                raise CheckFailed(f"call(weight_sum) gave {value}, first {self.ref_sum}")
        else:
            tracked = self.tracked["runs"]
            seen = self.model.call(runs_seen, "runs")
            if tracked.pending == 0 and seen != tracked.expected:
                raise LostData(f"runs: shipped code sees {seen} runs, acknowledged"
                               f" {tracked.expected}")

    def op_dataset(self) -> None:
        texts = self.rng.sample(TEXTS, self.rng.randint(4, 12))
        out = self.write(self.tracked["ds"], math.ceil(len(texts) / 4),
                         lambda: self.model.run_dataset(
                             texts, probes={"layers.1.mlp.post":
                                            lambda c, x: c.reduce("m", x, cloche.Mean())},
                             save="ds", batch_size=4, progress=False))
        if out["examples"] != len(texts) or "m" not in out["reducers"]:
            raise CheckFailed(f"run_dataset returned {out['examples']} examples,"
                              f" reducers {sorted(out['reducers'])}")

    def raise_early(self, future: Any, tracked: Tracked, delta: int) -> None:
        """The request ended before it started or reported progress: a restart, say."""
        try:
            future.result()
        except (cerr.ConnectionError, cerr.WorkerLost) as exc:
            if not isinstance(exc, cerr.SessionLost):
                tracked.pending += delta
                tracked.pending_after.add(type(exc).__name__)
            raise
        tracked.expected += delta  # it finished: committed
        raise CheckFailed("a 16-batch dataset run finished without a progress event")

    def _context_fingerprint(self, name: str) -> tuple[int, dict[str, Any]]:
        handle = self.model.save_context(name)
        reducers = {r: {s: digest(v) for s, v in sorted(handle.result(r).items())}
                    for r in sorted(handle.reducers())}
        return handle.num_runs, reducers

    def op_cancel(self) -> None:
        tracked = self.tracked["ds"]
        if tracked.pending:
            self.resync(tracked)
        before = self._context_fingerprint("ds")
        if before[0] != tracked.expected:
            raise LostData(f"ds: num_runs {before[0]}, acknowledged {tracked.expected}")
        first = threading.Event()
        from_callback = self.rng.random() < 0.5
        box: list[Any] = []

        def on_event(event: dict[str, Any]) -> None:
            if event.get("type") == "progress" and not first.is_set():
                first.set()
                if from_callback and box:
                    box[0].cancel()  # from the client's reader thread

        future = self.model.submit("run_dataset", LONG_DATASET, probes={
            "layers.1.mlp.post": slow_mean}, save="ds", batch_size=4, on_event=on_event)
        box.append(future)
        deadline = time.monotonic() + 120
        while not first.wait(0.02) and not future.done() and time.monotonic() < deadline:
            pass
        if future.done() and not first.is_set():
            self.raise_early(future, tracked, math.ceil(len(LONG_DATASET) / 4))
        if not first.is_set():
            self.stats.error("cancel", "NoProgressEvent", False,
                             "no progress event within 120 s", self.label)
        future.cancel()
        completed = False
        try:
            future.result(timeout=120)
            completed = True
        except (concurrent.futures.CancelledError, cerr.Cancelled):
            self.stats.error("cancel", "Cancelled", True, "cancelled as asked", self.label)
        except concurrent.futures.TimeoutError:
            raise CheckFailed("a cancelled request did not finish within 120 s") from None
        self.model.call(fence)  # the cancelled run is over (rolled back or committed)
        after = self._context_fingerprint("ds")
        full = math.ceil(len(LONG_DATASET) / 4)
        if after == before:
            self.stats.note("cancel: the context was untouched")
        elif after[0] == before[0] + full:
            self.stats.note("cancel: came after the last batch, the whole run committed"
                            + (" (result delivered)" if completed else ""))
            tracked.expected += full
        else:
            reducers = "changed" if after[1] != before[1] else "unchanged"
            raise LostData(f"ds after a cancel: num_runs {before[0]} -> {after[0]} (a run of"
                           f" {full} batches), reducers {reducers}")

    def op_disconnect(self) -> None:
        tracked = self.tracked["ds"]
        if tracked.pending:
            self.resync(tracked)
        session = self.model.session
        started = threading.Event()
        future = self.model.submit(
            "run_dataset", LONG_DATASET, probes={"layers.1.mlp.post": slow_mean}, save="ds",
            batch_size=4,
            on_event=lambda e: e.get("type") in ("started", "progress") and started.set())
        deadline = time.monotonic() + 60
        while not started.wait(0.02) and not future.done() and time.monotonic() < deadline:
            pass
        if future.done() and not started.is_set():
            self.raise_early(future, tracked, math.ceil(len(LONG_DATASET) / 4))
        time.sleep(self.rng.uniform(0, 0.1))
        how = self.rng.choice(["socket.shutdown", "model.close()"])
        if how == "socket.shutdown":
            try:
                self.model.executor._conn._framed.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the reader
        else:
            self.model.close()
        full = math.ceil(len(LONG_DATASET) / 4)
        try:
            future.result(timeout=120)
            tracked.expected += full
            self.stats.note("disconnect: the request finished before the connection dropped")
        except cerr.ConnectionError as exc:
            self.stats.error("disconnect", exc, True, f"connection dropped by {how}", self.label)
            tracked.pending += full
        except concurrent.futures.TimeoutError:
            raise CheckFailed(f"a request whose connection was dropped ({how}) neither"
                              " finished nor failed within 120 s") from None
        self.model.ping()  # reconnects: same object, same session
        if self.model.session != session or not self.model.executor.resumed:
            raise CheckFailed(f"reconnected to session {self.model.session[:8]}"
                              f" (resumed={self.model.executor.resumed}), not {session[:8]}")
        self.stats.note(f"disconnect ({how}): reconnected to the same session")
        self.resync(tracked)

    def op_scratch(self) -> None:
        handle = self.model.save_context("scratch")
        self.model.run(self.rng.choice(TEXTS), probes={self.points[0]: scratch_save},
                       save="scratch")
        if "x" not in handle:
            raise CheckFailed("scratch: nothing saved")
        handle.clear()
        if handle.keys() or handle.num_runs:
            raise CheckFailed("scratch: not empty after clear()")

    def op_ping(self) -> None:
        if self.model.ping(7) != 7:
            raise CheckFailed("ping did not echo")

    # ------------------------------------------------------------------ gate tasks
    def take_snapshots(self) -> int:
        for tracked in self.tracked.values():
            if tracked.pending:
                self.resync(tracked)
            tracked.snap = snapshot(self.model, tracked.name)
            if tracked.snap["num_runs"] != tracked.expected:
                raise LostData(f"{tracked.name}: num_runs {tracked.snap['num_runs']} at the"
                               f" snapshot, acknowledged {tracked.expected}")
        return sum(t.snap["num_runs"] for t in self.tracked.values() if t.snap)

    def verify_snapshots(self) -> list[str]:
        self.model.ping()  # reconnects by itself (SessionLost if the session is gone)
        problems = []
        if self.model.session != self.session0:
            problems.append(f"session changed: {self.session0[:8]} -> {self.model.session[:8]}")
        if not self.model.executor.resumed:
            problems.append("the reconnection did not resume the session")
        self.model.call(fence)
        for tracked in self.tracked.values():
            if tracked.snap is None:  # no snapshot (a hang recovery): every acknowledged run
                n = self.model.save_context(tracked.name).num_runs
                if not tracked.expected <= n <= tracked.expected + tracked.pending:
                    problems.append(f"{tracked.name}: num_runs {n}, acknowledged"
                                    f" {tracked.expected} (+{tracked.pending} unknown)")
                else:
                    self.settle(tracked, n)
                tracked.expected, tracked.pending = n, 0
                tracked.checked += 1
                continue
            now = snapshot(self.model, tracked.name)
            found = compare(tracked.snap, now, tracked.expected,
                            tracked.expected + tracked.pending)
            problems.extend(f"{tracked.name}: {problem}" for problem in found)
            if not found:
                self.settle(tracked, now["num_runs"])
            tracked.expected, tracked.pending, tracked.snap = now["num_runs"], 0, None
            tracked.checked += 1
        return problems

    def final_check(self) -> list[str]:
        self.model.call(fence)
        problems = []
        for tracked in self.tracked.values():
            n = self.model.save_context(tracked.name).num_runs
            if not tracked.expected <= n <= tracked.expected + tracked.pending:
                problems.append(f"{tracked.name}: num_runs {n}, acknowledged {tracked.expected}"
                                f" (+{tracked.pending} unknown)")
        return problems


class Pinger(threading.Thread):
    """The dedicated client: ``model.ping()`` back to back (``interval`` apart), timed."""

    def __init__(self, model: cloche.Model, run: Run, interval: float) -> None:
        super().__init__(name="soak-pinger", daemon=True)
        self.model = model
        self.session0 = model.session
        self.r = run
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.stop = run.stops["main"]

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            start = time.monotonic()
            try:
                if self.model.ping(i) != i:
                    raise CheckFailed("ping did not echo")
            except CheckFailed as exc:
                self.r.stats.error("ping", "WrongResult", False, str(exc), "pinger")
            except BaseException as exc:  # noqa: BLE001 - every failure is counted
                end = time.monotonic()
                window = self.r.windows.overlapping("main", start, end)
                expected = (isinstance(exc, cerr.ConnectionError) and window is not None
                            and not isinstance(exc, cerr.SessionLost))
                self.r.stats.error("ping", exc, expected,
                                   f"during {window}" if expected else "unexpected", "pinger")
                if isinstance(exc, cerr.SessionLost):
                    self.r.stats.lost_data("pinger", "ping", f"SessionLost: {exc}")
                    return
            else:
                seconds = time.monotonic() - start
                self.samples.append((start, seconds))
                self.r.stats.done("ping", start, seconds)
                if self.model.session != self.session0:
                    self.r.stats.error("ping", "SessionChanged", False, "unexpected", "pinger")
                    self.session0 = self.model.session
            if self.interval:
                time.sleep(self.interval)


# ----------------------------------------------------------------------------- the run

MAIN_MIX = {"run": 24, "read": 14, "generate": 8, "param": 8, "call": 8, "dataset": 10,
            "cancel": 4, "disconnect": 3, "scratch": 5}
SHARD_MIX = {"run": 35, "read": 20, "dataset": 15, "param": 10, "call": 10, "ping": 10}


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.monotonic()
        self.duration = args.minutes * 60.0
        self.token = secrets.token_urlsafe(24)
        self.stats = Stats(self.t0)
        self.windows = Windows()
        self.gates = {"main": Gate(), "shard": Gate()}
        self.stops = {"main": threading.Event(), "shard": threading.Event()}
        self.monitor = Monitor(self.t0)
        self.servers: list[Server] = []
        self.report: dict[str, Any] = {"events": [], "faults": {}, "processes": {}, "hangs": []}
        self.proc_info: dict[str, dict[str, Any]] = {}
        self.main_count = 0
        self.quiet_since = time.monotonic()
        self.killed_ranks: dict[str, int] = {}
        self.rng = random.Random(args.seed)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def log(self, message: str) -> None:
        line = f"[{self.now():7.1f} s] {message}"
        print(line, flush=True)
        self.report["events"].append(line)

    def start_server(self, label: str, args: list[str]) -> Server:
        server = Server(label, self.token, self.workdir, args, self.args.model)
        self.servers.append(server)
        server.wait_listening()
        self.monitor.watch(label, server.pid)
        self.log(f"{label}: listening on {server.address} after {server.startup_s:.1f} s"
                 f" (pid {server.pid}; {server.command})")
        return server

    def connect(self) -> cloche.Model:
        return cloche.connect(self.address, token=self.token)

    def threads_of(self, pid: int) -> int | None:
        status = proc_status(pid)
        return None if status is None else status["Threads"]

    # ------------------------------------------------------------------ main
    def main(self) -> dict[str, Any]:
        self.workdir = pathlib.Path(self.args.workdir or tempfile.mkdtemp(prefix="cloche-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.monitor.start()
        try:
            return self._main()
        finally:
            for server in self.servers:
                if server.proc.poll() is None:
                    server.stop(10)
                for pid in self.killed_ranks.values():
                    if alive(pid):
                        os.kill(pid, signal.SIGKILL)
                server.close_log()
            self.monitor.stopped.set()
            if not self.args.keep and not self.args.workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def _main(self) -> dict[str, Any]:
        args = self.args
        client_threads_before = threading.active_count()
        self.state_main = self.workdir / "state-main"
        main1 = self.start_main(0)
        self.address = main1.address
        self.log(f"connecting {args.clients} clients (1 pinger + {args.clients - 1} workers)")
        pinger = Pinger(self.connect(), self, args.ping_interval_ms / 1000)
        pinger.model.ping()
        workers = []
        for i in range(1, args.clients):
            model = self.connect()
            _ = model.tokenizer  # loaded here, one client at a time (README: import race)
            workers.append(Client(f"c{i:02d}", "main", model, MAIN_MIX,
                                  ["layers.0.resid_post"], keep, args.seed * 1000 + i, self))
        self.proc_info["main-1"]["threads with clients connected"] = self.threads_of(main1.pid)
        for worker in workers:
            self.gates["main"].register(worker.label)
        pinger.start()
        for worker in workers:
            worker.start()
        self.quiet_since = time.monotonic()
        self.log(f"load started: {len(workers)} workers, 1 pinger")

        # ---- fault 1: kill -9 and restart on the same port with the same state dir
        self.wait_until(self.duration / 3)
        self.restart_fault()

        # ---- fault 2: a sharded server loses a rank
        self.wait_until(2 * self.duration / 3)
        self.sharded_phase()

        # ---- the end
        self.wait_until(self.duration)
        self.log("stopping the load")
        self.stops["main"].set()
        self.gates["main"].release()
        everyone = [*workers, pinger]
        stopped_at, recovered = time.monotonic(), False
        while any(w.is_alive() for w in everyone) and time.monotonic() - stopped_at < 180:
            self.join(everyone, 1.0)
            busy = [w.name for w in everyone if w.is_alive()]
            idle = time.monotonic() - max(self.stats.last_heavy, self.quiet_since)
            if busy and not recovered and idle > self.args.hang_s:
                self.recover_from_hang(f"while stopping, {len(busy)} clients stuck; no model"
                                       f" work finished for {idle:.0f} s")
                recovered = True
        for worker in everyone:
            if worker.is_alive():
                self.stats.error("stop", "Hang", False, "still in an operation at the end",
                                 worker.name)
        for worker in workers:
            if worker.is_alive():
                continue
            try:
                for problem in worker.final_check():
                    self.stats.lost_data(worker.label, "final check", problem)
            except Exception as exc:  # noqa: BLE001 - counted
                self.stats.error("final check", exc, False, "unexpected", worker.label)
        last = self.main
        info = self.proc_info[last.label]
        info["threads at end, clients connected"] = self.threads_of(last.pid)
        for client in everyone:
            client.model.close()
        closed_at = time.monotonic()
        while (self.threads_of(last.pid) or 0) > info["threads at start"] and \
                time.monotonic() - closed_at < 10:
            time.sleep(0.2)
        info["threads at end, clients closed"] = self.threads_of(last.pid)
        info["clients closed to threads settled s"] = round(time.monotonic() - closed_at, 1)
        try:  # what those threads are (one more connection, two more threads, to ask)
            with self.connect() as probe:
                asked = probe.submit("call", server_threads)
                self.report[f"{last.label} threads after clients closed"] = [
                    f"{name}: {' <- '.join(reversed(stack))}"
                    for name, stack in asked.result(timeout=60)]
        except Exception as exc:  # noqa: BLE001 - counted
            self.stats.error("thread dump", exc, False, "unexpected", "benchmark")
        time.sleep(1)
        self.monitor.sample(last.label, last.pid)
        code, took = last.stop()
        self.log(f"{last.label}: SIGTERM -> exit status {code} after {took:.1f} s")
        info.update(exit=code, exit_note=f"SIGTERM by the benchmark, exited after {took:.1f} s")
        self.report["client process threads"] = {"before": client_threads_before,
                                                 "after": threading.active_count()}
        self.report["pinger"] = pinger.samples
        self.report["processes"] = self.proc_info
        return self.summarize()

    def join(self, threads: list[threading.Thread], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # ------------------------------------------------------------------ the main server
    def start_main(self, port: int) -> Server:
        self.main_count += 1
        label = f"main-{self.main_count}"
        server = self.start_server(label, ["--port", str(port), "--state-dir",
                                           str(self.state_main)])
        self.proc_info[label] = {"threads at start": self.threads_of(server.pid)}
        self.main = server
        return server

    def wait_until(self, t: float) -> None:
        """Sleep until ``t`` s into the run, recovering the main server if it hangs."""
        while True:
            idle = time.monotonic() - max(self.stats.last_heavy, self.quiet_since)
            if idle > self.args.hang_s and not self.stops["main"].is_set():
                self.recover_from_hang(f"no model work finished for {idle:.0f} s")
            if self.now() >= t:
                return
            time.sleep(min(1.0, t - self.now()))

    def pause(self, seconds: float) -> None:
        self.wait_until(self.now() + seconds)

    def recover_from_hang(self, why: str) -> None:
        """The main server stopped doing model work: get its stacks (SIGABRT with
        PYTHONFAULTHANDLER=1 writes them to its log), restart it, and check every context."""
        server = self.main
        self.log(f"{server.label}: HANG ({why}); SIGABRT for its stacks, then a restart")
        self.stats.error("server", "ServerHang", False, why, server.label)
        fault = self.replace_main("hang recovery", abort=True)
        fault["why"] = why
        fault["worker thread stack"] = server.stack_of("_work_loop")
        self.report["hangs"].append(fault)

    def replace_main(self, why: str, *, abort: bool = False) -> dict[str, Any]:
        """Kill the main server (kill -9, or SIGABRT to get its stacks), start it again on the
        same port with the same state dir, and have every client check its contexts."""
        gate = self.gates["main"]
        old = self.main
        fault: dict[str, Any] = {"at s": round(self.now(), 1)}
        window = self.windows.open("main", why)
        info = self.proc_info[old.label]
        info["threads before kill"] = self.threads_of(old.pid)
        self.monitor.sample(old.label, old.pid)
        killed_at = time.monotonic()
        if abort:
            code = old.abort()
            note = "SIGABRT by the benchmark after it hung (its stacks are in its log)"
        else:
            old.kill9()
            code, note = old.proc.returncode, "kill -9 by the benchmark"
        info.update(exit=code, exit_note=note)
        self.log(f"{old.label}: {'SIGABRT' if abort else 'kill -9'} -> exit status {code}")
        new = self.start_main(old.port)
        fault["kill to listening s"] = round(time.monotonic() - killed_at, 1)
        self.log(f"{why}: every client checks its contexts")
        results, stuck = gate.run(Client.verify_snapshots, timeout=300)
        fault["kill to all clients verified s"] = round(time.monotonic() - killed_at, 1)
        gate.frozen = False
        gate.release()
        self.windows.close(window)
        self.quiet_since = time.monotonic()
        checked = 0
        for name, value in sorted(results.items()):
            if isinstance(value, cerr.SessionLost):
                self.stats.lost_data(name, f"after {why}", f"SessionLost: {value}")
            elif isinstance(value, Exception):
                self.stats.error("verify", value, False, "unexpected", name)
            else:
                checked += 3
                for problem in value:
                    self.stats.lost_data(name, f"after {why}", problem)
        if stuck:
            self.stats.error("verify", "Hang", False, f"not verified within 300 s: {stuck}",
                             ",".join(sorted(stuck)))
        fault["contexts checked"] = checked
        self.proc_info[new.label]["threads with clients reconnected"] = self.threads_of(new.pid)
        return fault

    def restart_fault(self) -> None:
        gate = self.gates["main"]
        self.log("restart fault: every client snapshots its committed contexts")
        gate.frozen = True
        results, stuck = gate.run(Client.take_snapshots, timeout=300)
        gate.release()
        snapshotted = {"contexts snapshotted": 3 * len(results), "runs in the snapshots": sum(
            v for v in results.values() if isinstance(v, int))}
        for name, value in results.items():
            if isinstance(value, LostData):
                self.stats.lost_data(name, "snapshot", str(value))
            elif isinstance(value, Exception):
                self.stats.error("snapshot", value, False, "unexpected", name)
        if stuck:
            self.stats.error("snapshot", "Hang", False, f"no snapshot within 300 s: {stuck}",
                             ",".join(sorted(stuck)))
        time.sleep(self.rng.uniform(1.0, 3.0))  # the clients work on: the kill hits requests
        fault = {**snapshotted, **self.replace_main("the restart")}
        self.report["faults"]["kill -9 and restart"] = fault
        self.log(f"restart fault done: {fault}")

    # ------------------------------------------------------------------ fault 2
    def sharded_phase(self) -> None:
        proc_info = self.proc_info
        fault: dict[str, Any] = {}
        work = min(30.0, max(5.0, self.duration * 0.05))
        state = self.workdir / "state-sharded"
        flags = ["--world-size", "2", "--state-dir", str(state)]
        shard1 = self.start_server("sharded-1", ["--port", "0", *flags])
        ranks = children(shard1.pid)
        if len(ranks) != 1:
            raise RuntimeError(f"sharded-1 should have one child (rank 1), has {ranks}")
        rank1 = ranks[0]
        self.monitor.watch("sharded-1 rank 1", rank1)
        proc_info["sharded-1"] = {"threads at start": self.threads_of(shard1.pid)}
        proc_info["sharded-1 rank 1"] = {"threads at start": self.threads_of(rank1)}
        gate, stop = self.gates["shard"], self.stops["shard"]
        clients = []
        for i in range(self.args.shard_clients):
            model = cloche.connect(shard1.address, token=self.token)
            _ = model.tokenizer
            clients.append(Client(f"s{i}", "shard", model, SHARD_MIX,
                                  ["layers.0.resid_post", "layers.1.resid_post"],
                                  keep_sharded, self.args.seed * 1000 + 100 + i, self))
            gate.register(clients[-1].label)
        for client in clients:
            client.start()
        self.log(f"sharded fault: {len(clients)} clients work on sharded-1 for {work:.0f} s")
        self.pause(work)
        gate.frozen = True
        results, stuck = gate.run(Client.take_snapshots, timeout=300)
        gate.release()
        fault["contexts snapshotted"] = 3 * len(results)
        fault["runs in the snapshots"] = sum(v for v in results.values() if isinstance(v, int))
        for name, value in results.items():
            if isinstance(value, Exception):
                self.stats.error("snapshot", value, False, "unexpected", name)
        self.pause(self.rng.uniform(1.0, 2.0))
        window = self.windows.open("shard", "rank 1 lost")
        proc_info["sharded-1"]["threads before kill"] = self.threads_of(shard1.pid)
        os.kill(rank1, signal.SIGKILL)
        self.killed_ranks["sharded-1 rank 1"] = rank1
        killed_at = time.monotonic()
        self.log(f"sharded-1: kill -9 rank 1 (pid {rank1})")
        proc_info["sharded-1 rank 1"].update(
            exit="SIGKILL", exit_note="kill -9 by the benchmark (not our child: no status)")
        code = shard1.wait_exit(180)
        if code is None:
            self.stats.error("sharded server", "Hang", False,
                             "the server did not exit within 180 s of losing rank 1", "sharded-1")
            shard1.kill9()
            code = shard1.proc.returncode
        fault["rank killed to server exit s"] = round(time.monotonic() - killed_at, 1)
        proc_info["sharded-1"].update(exit=code, exit_note="exited by itself after losing rank 1"
                                      if shard1.killed_by_us is None else "killed: it hung")
        self.log(f"sharded-1: exit status {code} (expected 3)")
        if code != 3:
            self.stats.error("sharded server", f"ExitStatus{code}", False,
                             "exit status after losing a rank is not 3", "sharded-1")
        fault["WorkerLost seen by clients"] = sum(
            n for (kind, name, _, _), n in self.stats.errors.items() if name == "WorkerLost")
        shard2 = self.start_server("sharded-2", ["--port", str(shard1.port), *flags])
        ranks2 = children(shard2.pid)
        rank1b = ranks2[0] if ranks2 else None
        if rank1b is not None:
            self.monitor.watch("sharded-2 rank 1", rank1b)
        proc_info["sharded-2"] = {"threads at start": self.threads_of(shard2.pid)}
        fault["restart: rank killed to listening s"] = round(time.monotonic() - killed_at, 1)
        results, stuck = gate.run(Client.verify_snapshots, timeout=300)
        fault["rank killed to all clients verified s"] = round(time.monotonic() - killed_at, 1)
        gate.frozen = False
        gate.release()
        self.windows.close(window)
        checked = 0
        for name, value in sorted(results.items()):
            if isinstance(value, cerr.SessionLost):
                self.stats.lost_data(name, "after sharded restart", f"SessionLost: {value}")
            elif isinstance(value, Exception):
                self.stats.error("verify", value, False, "unexpected", name)
            else:
                checked += 3
                for problem in value:
                    self.stats.lost_data(name, "after sharded restart", problem)
        if stuck:
            self.stats.error("verify", "Hang", False, f"not verified within 300 s: {stuck}",
                             ",".join(sorted(stuck)))
        fault["contexts checked after restart"] = checked
        self.pause(work / 2)
        stop.set()
        gate.release()
        for client in clients:
            client.join(180)
            if client.is_alive():
                self.stats.error("stop", "Hang", False, "shard client still busy after 180 s",
                                 client.label)
                continue
            try:
                for problem in client.final_check():
                    self.stats.lost_data(client.label, "final check", problem)
            except Exception as exc:  # noqa: BLE001 - counted
                self.stats.error("final check", exc, False, "unexpected", client.label)
            client.model.close()
        closed_at = time.monotonic()
        while (self.threads_of(shard2.pid) or 0) > proc_info["sharded-2"]["threads at start"] \
                and time.monotonic() - closed_at < 10:
            time.sleep(0.2)
        proc_info["sharded-2"]["threads at end, clients closed"] = self.threads_of(shard2.pid)
        proc_info["sharded-2"]["clients closed to threads settled s"] = round(
            time.monotonic() - closed_at, 1)
        code2, took = shard2.stop()
        proc_info["sharded-2"].update(exit=code2, exit_note=f"SIGTERM by the benchmark, exited"
                                                            f" after {took:.1f} s")
        if rank1b is not None:
            deadline = time.monotonic() + 15
            while alive(rank1b) and time.monotonic() < deadline:
                time.sleep(0.2)
            gone = not alive(rank1b)
            proc_info["sharded-2 rank 1"] = {"exit": "exited" if gone else "STILL RUNNING",
                                             "exit_note": "stopped with its server" if gone else
                                             "orphaned after its server exited"}
            if not gone:
                self.stats.error("sharded server", "OrphanRank", False,
                                 "rank 1 still running 15 s after its server exited", "sharded-2")
                os.kill(rank1b, signal.SIGKILL)
        self.log(f"sharded-2: SIGTERM -> exit status {code2} after {took:.1f} s")
        self.report["faults"]["sharded server loses rank 1"] = fault
        self.log(f"sharded fault done: {fault}")

    # ------------------------------------------------------------------ report
    def summarize(self) -> dict[str, Any]:
        stats = self.stats
        report = self.report
        report["config"] = {
            "minutes": self.args.minutes, "clients": self.args.clients,
            "shard clients": self.args.shard_clients, "seed": self.args.seed,
            "model": self.args.model or "the shipped default model",
            "ping interval ms": self.args.ping_interval_ms,
            "load average at end": os.getloadavg(), "cpus": os.cpu_count(),
        }
        report["wall s"] = round(self.now(), 1)
        ops = {}
        for kind in sorted(set(stats.ok) | {k for k, *_ in stats.errors}):
            target = "shard" if kind.startswith("sharded ") else "main"
            every = stats.latency.get(kind, [])
            lat = [s for start, s in every
                   if self.windows.overlapping(target, start, start + s) is None]
            ops[kind] = {
                "ok": stats.ok[kind],
                "expected errors": sum(n for (k, _, e, _), n in stats.errors.items()
                                       if k == kind and e),
                "unexpected errors": sum(n for (k, _, e, _), n in stats.errors.items()
                                         if k == kind and not e),
                "p50 ms": round(statistics.median(lat) * 1e3, 2) if lat else None,
                "p99 ms": round(quantile(lat, 0.99) * 1e3, 2) if lat else None,
                "max ms (fault windows included)": round(max(s for _, s in every) * 1e3, 1)
                if every else None,
            }
        report["operations"] = ops
        report["errors"] = [
            {"op": k, "type": t, "expected": e, "why": w, "count": n, **stats.error_samples[
                (k, t, e, w)]}
            for (k, t, e, w), n in sorted(stats.errors.items())
        ]
        report["lost data"] = stats.lost
        report["notes"] = dict(stats.notes)
        fault_spans = [(a, b if b is not None else a) for target, _, a, b in self.windows.spans
                       if target == "main"]
        samples = report.pop("pinger")
        steady = [s for start, s in samples
                  if not any(a - 1 <= start <= b + 1 for a, b in fault_spans)]
        during = [s for start, s in samples if any(a - 1 <= start <= b + 1
                                                    for a, b in fault_spans)]
        report["ping under load"] = {
            "n": len(steady),
            "p50 ms": round(statistics.median(steady) * 1e3, 3) if steady else None,
            "p90 ms": round(quantile(steady, 0.90) * 1e3, 3) if steady else None,
            "p99 ms": round(quantile(steady, 0.99) * 1e3, 3) if steady else None,
            "p99.9 ms": round(quantile(steady, 0.999) * 1e3, 3) if steady else None,
            "max ms": round(max(steady) * 1e3, 1) if steady else None,
            "during the restart: n": len(during),
            "during the restart: max ms": round(max(during) * 1e3, 1) if during else None,
        }
        for label, samples_ in self.monitor.samples.items():
            info = report["processes"].setdefault(label, {})
            if samples_:
                info["rss start MiB"] = round(samples_[0][1] / 1024, 1)
                info["rss end MiB"] = round(samples_[-1][1] / 1024, 1)
                info["rss peak MiB"] = round(max(max(s[1], s[2]) for s in samples_) / 1024, 1)
                info["threads first sample"] = samples_[0][3]
                info["threads last sample"] = samples_[-1][3]
                info["alive s"] = round(samples_[-1][0] - samples_[0][0], 1)
                half = [s for s in samples_ if s[0] >= (samples_[0][0] + samples_[-1][0]) / 2]
                if len(half) >= 10:
                    xs = [s[0] / 60 for s in half]
                    ys = [s[1] / 1024 for s in half]
                    mx, my = statistics.fmean(xs), statistics.fmean(ys)
                    var = sum((x - mx) ** 2 for x in xs)
                    info["rss slope, 2nd half, MiB/min"] = round(
                        sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var, 2
                    ) if var else None
                info["rss timeline (s, MiB)"] = [
                    (round(s[0]), round(s[1] / 1024, 1)) for s in samples_[::max(
                        1, len(samples_) // 60)]]
        report["server logs"] = {s.label: s.log_problems() for s in self.servers}
        return report


# ----------------------------------------------------------------------------- printing


def render(report: dict[str, Any]) -> str:
    out = []
    config = report["config"]
    total = sum(v["ok"] for v in report["operations"].values())
    unexpected = sum(v["unexpected errors"] for v in report["operations"].values())
    expected = sum(v["expected errors"] for v in report["operations"].values())
    load = ", ".join(f"{x:.1f}" for x in config["load average at end"])
    out.append(f"soak: {config['minutes']:g} min planned, {report['wall s']:.0f} s wall;"
               f" {config['clients']} clients on the main server (1 pinger), "
               f"{config['shard clients']} on the sharded one; model: {config['model']};"
               f" load average at end {load} on {config['cpus']} CPUs")
    lost = report["lost data"]
    out.append(f"\n**lost data: {len(lost)}**" + ("" if not lost else " — " + "; ".join(
        f"{x['client']} {x['what']}: {x['detail']}" for x in lost[:10])))
    out.append(f"operations: {total} ok, {expected} expected errors, {unexpected} unexpected"
               " errors\n")
    out.append("| operation | ok | expected errors | unexpected errors | p50 ms | p99 ms |"
               " max ms |")
    out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for kind, v in report["operations"].items():
        cells = [v[k] if v[k] is not None else "—" for k in (
            "p50 ms", "p99 ms", "max ms (fault windows included)")]
        out.append(f"| {kind} | {v['ok']} | {v['expected errors']} | {v['unexpected errors']} |"
                   f" {cells[0]} | {cells[1]} | {cells[2]} |")
    out.append("(p50/p99 of the successful operations that did not overlap a fault window;"
               " max over all of them)")
    out.append("\n| operation | error | expected | why | count | first message |")
    out.append("| --- | --- | --- | --- | ---: | --- |")
    for e in report["errors"]:
        message = e["message"].replace("|", "\\|").replace("\n", " ")[:140]
        out.append(f"| {e['op']} | {e['type']} | {'yes' if e['expected'] else '**no**'} |"
                   f" {e['why']} | {e['count']} | {message} |")
    p = report["ping under load"]
    out.append(f"\nping under load (outside the restart window): n={p['n']}, p50 {p['p50 ms']}"
               f" ms, p90 {p['p90 ms']} ms, p99 {p['p99 ms']} ms, p99.9 {p['p99.9 ms']} ms, max"
               f" {p['max ms']} ms; during the restart: {p['during the restart: n']} pings, max"
               f" {p['during the restart: max ms']} ms\n")
    out.append("| process | RSS start MiB | RSS peak MiB | RSS end MiB | RSS slope 2nd half"
               " MiB/min | threads (first → last sample) | exit status |")
    out.append("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for label, info in report["processes"].items():
        out.append(
            f"| {label} | {info.get('rss start MiB', '—')} | {info.get('rss peak MiB', '—')} |"
            f" {info.get('rss end MiB', '—')} | {info.get('rss slope, 2nd half, MiB/min', '—')}"
            f" | {info.get('threads first sample', '—')} → {info.get('threads last sample', '—')}"
            f" | {info.get('exit', '—')} ({info.get('exit_note', '')}) |")
    out.append("\nthread counts: " + "; ".join(
        f"{label}: " + ", ".join(f"{k} {v}" for k, v in info.items() if k.startswith("threads"))
        for label, info in report["processes"].items()))
    out.append(f"client process threads: {report['client process threads']}")
    for key, dump in report.items():
        if key.endswith("threads after clients closed"):
            out.append(f"{key} (asked through one more connection):\n  " + "\n  ".join(dump))
    for name, fault in report["faults"].items():
        out.append(f"fault '{name}': " + ", ".join(f"{k} {v}" for k, v in fault.items()))
    for hang in report["hangs"]:
        stack = hang.pop("worker thread stack", [])
        out.append("**server hang**: " + ", ".join(f"{k} {v}" for k, v in hang.items())
                   + "\n  worker thread (most recent call first):\n    " + "\n    ".join(stack))
        hang["worker thread stack"] = stack
    out.append("checks: " + ", ".join(f"{k}: {v}" for k, v in sorted(report["notes"].items())))
    for label, logs in report["server logs"].items():
        if logs.get("problem_lines"):
            out.append(f"server log {label}: {logs['problem_lines']} warning/error lines; first: "
                       + " // ".join(logs["first"][:4]))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Loopback only. See the module docstring (and benchmarks/README.md) for details.")
    parser.add_argument("--minutes", type=float, default=10.0,
                        help="duration of the load (default 10; 0.5 for a quick check)")
    parser.add_argument("--clients", type=int, default=16,
                        help="clients of the main server, the pinger included (default 16)")
    parser.add_argument("--shard-clients", type=int, default=2,
                        help="clients of the sharded server during its fault (default 2)")
    parser.add_argument("--model", default=None,
                        help="model directory to serve (default: the shipped default model)")
    parser.add_argument("--ping-interval-ms", type=float, default=5.0,
                        help="pause between two pings of the pinger (default 5)")
    parser.add_argument("--hang-s", type=float, default=45.0,
                        help="no model work finished by any client for this long (outside a"
                             " fault) means the server hangs: it is sent SIGABRT (its stacks go"
                             " to its log) and restarted (default 45)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the whole report (timelines, samples) as JSON")
    parser.add_argument("--workdir", default=None,
                        help="where the state dirs and server logs go (default: a temporary"
                             " directory, removed at the end)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (state dirs, server logs)")
    args = parser.parse_args()
    if args.clients < 2:
        parser.error("--clients must be at least 2 (a pinger and a worker)")
    torch.set_num_threads(1)
    report = Run(args).main()
    print()
    print(render(report))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1, default=str))
        print(f"\nwrote {args.json}")
    lost, unexpected = len(report["lost data"]), sum(
        v["unexpected errors"] for v in report["operations"].values())
    sys.exit(1 if lost or unexpected else 0)


if __name__ == "__main__":
    main()
