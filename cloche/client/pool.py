"""``cloche.Pool``: one client driving several servers at once (many checkpoints, many models).

Requests go out to every server before any result is awaited, so servers work in parallel;
results come back in the order of the addresses. Each server has a key (its address, or the
key given for it: a revision, a training step); :meth:`Pool.each` returns results keyed so, as
:class:`Results`, which plots a value over the keys (e.g. over training steps).

:meth:`Pool.launch` starts one local ``cloche serve`` per checkpoint (per revision of a hub
model, or per directory) and stops them when the pool closes.
"""

from __future__ import annotations

import concurrent.futures
import os
import queue
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from typing_extensions import Self

from cloche import errors
from cloche.api.futures import RequestFuture
from cloche.api.model import Model
from cloche.client.executor import connect

__all__ = ["Pool", "Results"]


def _per_server(value: Any, n: int, what: str) -> list[Any]:
    """One setting for every server, or a list/tuple with one per server."""
    if not isinstance(value, (list, tuple)):
        return [value] * n
    if len(value) != n:
        raise errors.UsageError(f"got {len(value)} {what} for {n} addresses")
    return list(value)


class Results(dict[Any, Any]):
    """Results keyed by server (revision, training step, model name), in the pool's order."""

    def values_of(self, value: Callable[[Any], Any] | None = None) -> dict[Any, float]:
        """``{key: float(value(result))}`` (``value`` None: the result itself)."""
        return {k: float(v if value is None else value(v)) for k, v in self.items()}

    def plot(self, value: Callable[[Any], Any] | None = None, *, ax: Any = None,
             label: str | None = None, xlabel: str = "training step",
             ylabel: str | None = None, title: str | None = None) -> Any:
        """A line of ``value(result)`` over the keys (numbers: training steps) with a marker
        per checkpoint; string keys (revision names) are placed evenly and labelled. Returns
        the matplotlib Axes (``ax.figure.savefig(path)`` in scripts)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError as exc:
            raise errors.UsageError("plots need matplotlib: pip install 'cloche[experiments]'"
                                    ) from exc
        if not self:
            raise errors.UsageError("there are no results to plot")
        points = self.values_of(value)
        keys = list(points)
        numeric = all(isinstance(k, (int, float)) and not isinstance(k, bool) for k in keys)
        xs = keys if numeric else list(range(len(keys)))
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(xs, list(points.values()), marker="o", label=label)
        if not numeric:
            ax.set_xticks(xs, [str(k) for k in keys], rotation=30, ha="right")
        ax.set_xlabel(xlabel)
        if ylabel:
            ax.set_ylabel(ylabel)
        if title:
            ax.set_title(title)
        if label:
            ax.legend()
        return ax


class Pool:
    """Several servers driven as one. ``addresses`` is a list, or a mapping ``{key: address}``
    whose keys name the servers in :meth:`each` (default: the addresses). ``token`` and ``tls``
    are one setting for all servers or a list with one per address (``None`` tokens come from
    ``$CLOCHE_TOKEN``)."""

    def __init__(self, addresses: Sequence[str | tuple[str, int]]
                 | Mapping[Any, str | tuple[str, int]], *,
                 token: str | Sequence[str | None] | None = None, tls: Any = None,
                 timeout: float = 30.0) -> None:
        if not addresses:
            raise errors.UsageError("a Pool needs at least one address")
        if isinstance(addresses, Mapping):
            self.keys: list[Any] = list(addresses)
            addresses = list(addresses.values())
        else:
            self.keys = [a if isinstance(a, str) else f"{a[0]}:{a[1]}" for a in addresses]
        tokens = _per_server(token, len(addresses), "tokens")
        settings = _per_server(tls, len(addresses), "TLS settings")
        self.models: list[Model] = []
        self._servers: list[_LocalServer] = []
        try:
            for address, tok, tls_one in zip(addresses, tokens, settings, strict=True):
                self.models.append(connect(address, token=tok, tls=tls_one, timeout=timeout))
        except BaseException:
            self.close()
            raise

    @classmethod
    def launch(cls, model: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]
               | Mapping[Any, str | os.PathLike[str]], *,
               revisions: Sequence[str] | None = None, dtype: str | None = None,
               device: str | None = None, threads: int | None = None,
               startup_timeout: float = 300.0, timeout: float = 30.0) -> Pool:
        """Start one local ``cloche serve`` per checkpoint and connect to all of them.

        - ``Pool.launch("org/name", revisions=["step1000", "step2000"])``: one server per
          revision of a hub model (through the Hugging Face cache); keys are the revisions.
        - ``Pool.launch({0: "./ckpt-0", 500: "./ckpt-500"})``: one server per directory;
          keys are the mapping's (training steps, say).
        - ``Pool.launch(["./a", "./b"])``: keys are the directories as given.

        The servers listen on loopback at free ports with a fresh random token (handed to them
        in their environment, never on a command line) and start in parallel; ``close()`` (or
        leaving the ``with`` block) stops them. ``threads`` is each server's ``--threads``.
        """
        sources: dict[Any, tuple[str, str | None]]
        if revisions is not None:
            if not isinstance(model, (str, os.PathLike)):
                raise errors.UsageError("revisions= needs one hub model name, not a list or"
                                        " mapping of checkpoints")
            if not revisions:
                raise errors.UsageError("revisions= is empty: name at least one revision")
            sources = {rev: (os.fspath(model), rev) for rev in revisions}
        elif isinstance(model, Mapping):
            sources = {k: (os.fspath(v), None) for k, v in model.items()}
        elif isinstance(model, (str, os.PathLike)):
            sources = {os.fspath(model): (os.fspath(model), None)}
        else:
            sources = {os.fspath(m): (os.fspath(m), None) for m in model}
        if not sources:
            raise errors.UsageError("Pool.launch needs at least one checkpoint")
        token = secrets.token_urlsafe(24)
        options = []
        for flag, value in (("--dtype", dtype), ("--device", device), ("--threads", threads)):
            if value is not None:
                options += [flag, str(value)]
        servers = [_LocalServer(source, revision, token, options)
                   for source, revision in sources.values()]
        try:
            deadline = time.monotonic() + startup_timeout
            addresses = {key: server.address(deadline)
                         for key, server in zip(sources, servers, strict=True)}
            pool = cls(addresses, token=token, timeout=timeout)
        except BaseException:
            for server in servers:
                server.stop()
            raise
        pool._servers = servers
        return pool

    def __len__(self) -> int:
        return len(self.models)

    def submit(self, method: str, *args: Any, **kwargs: Any) -> list[RequestFuture[Any]]:
        """``model.submit(method, ...)`` on every server."""
        return [model.submit(method, *args, **kwargs) for model in self.models]

    def apply(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every server; results in address order.

        If any fails, the others are still awaited, then the first error is raised.
        """
        return _gather(self.submit(method, *args, **kwargs))

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(model, *args, **kwargs)`` on every server."""
        return self.apply("call", fn, *args, **kwargs)

    def each(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Results:
        """``fn(model, *args, **kwargs)`` here, against every server at once (one thread per
        server), keyed by server: the same experiment (any function of the public API, e.g.
        from ``cloche.experiments``) over every checkpoint. If any fails, the others still
        finish, then the first error (in pool order) is raised."""
        with concurrent.futures.ThreadPoolExecutor(len(self.models)) as threads:
            futures = [threads.submit(fn, model, *args, **kwargs) for model in self.models]
            concurrent.futures.wait(futures)
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
        return Results(zip(self.keys, (f.result() for f in futures), strict=True))

    def map(self, fn: Callable[..., Any], items: Iterable[Any]) -> list[Any]:
        """``fn(model, item)`` for each item, items spread round-robin over the servers."""
        futures = [
            self.models[i % len(self.models)].submit("call", fn, item)
            for i, item in enumerate(items)
        ]
        return _gather(futures)

    def close(self) -> None:
        """Disconnect from every server, and stop the servers :meth:`launch` started."""
        for model in self.models:
            model.close()
        for server in self._servers:
            server.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(futures: list[RequestFuture[Any]]) -> list[Any]:
    try:
        outcomes = []
        for future in futures:
            try:
                outcomes.append((True, future.result()))
            except errors.ClocheError as exc:
                outcomes.append((False, exc))
    except KeyboardInterrupt:
        for future in futures:
            future.cancel()
        raise
    for ok, value in outcomes:
        if not ok:
            raise value
    return [value for _, value in outcomes]


class _LocalServer:
    """``python -m cloche serve --port 0`` for one checkpoint, in a subprocess of its own."""

    def __init__(self, model: str, revision: str | None, token: str,
                 options: list[str]) -> None:
        cmd = [sys.executable, "-m", "cloche", "serve", "--model", model, "--port", "0",
               "--log-level", "WARNING", *options]
        if revision is not None:
            cmd += ["--revision", revision]
        self.label = model if revision is None else f"{model}@{revision}"
        # the folder holding this very package goes first, so the server imports this cloche
        here = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "CLOCHE_TOKEN": token, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._pump, args=(self._proc.stdout, self._lines.put, True),
                             daemon=True),
            threading.Thread(target=self._pump, args=(self._proc.stderr, self._stderr.append,
                                                      False), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _pump(self, stream: Any, sink: Callable[[Any], None], ends: bool) -> None:
        for line in stream:
            sink(line)
        if ends:
            self._lines.put(None)

    def address(self, deadline: float) -> str:
        """The ``host:port`` the server prints once it listens (ConnectionError if it dies)."""
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                self.stop()
                self._readers[1].join(timeout=5)
                tail = "".join(self._stderr)[-2000:].strip()
                raise errors.ConnectionError(f"the server for {self.label} did not start: {tail}")
            if line.startswith("listening on "):
                return line.split("listening on ", 1)[1].strip()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()
