"""Progress for every call that can take seconds: one reporter, shown as a tqdm bar or sent to
a callback.

``model.run``, ``generate``, ``run_dataset`` and every experiment in ``cloche.experiments``
take ``progress=``, and all of them use :class:`Progress`:

- ``True`` (the default): a tqdm bar (a widget in a notebook), drawn by these rules —

  * nothing is drawn for a call that ends within :data:`DELAY_S` (1 s): a loop of quick
    calls stays silent;
  * a request waiting behind others in a server's queue shows at once (``run (queued: 2
    ahead)``), since waiting for other people's work is worth knowing about (with nothing
    ahead it starts at once: a bar asks the server only for what it shows, see
    :attr:`Progress.wanted_events`, so such a request costs no event at all);
  * past :data:`DELAY_S` the bar appears, with counts where the work has them (dataset
    examples, experiment steps) and the elapsed time otherwise;
  * when the call ends, a bar that was up for less than :data:`KEEP_S` (10 s) disappears; a
    longer one stays, as a record of what took the time;
  * bars do not nest: a call made while another call reports in the same thread (the runs
    inside an experiment, a function in ``model.call`` on a local model) reports to that
    call's bar, and code running inside a request on a server draws none.

- a callable: called with every event dict —
  ``{"type": "queued", "position": n, "ahead": k}`` when a request enters a server's queue
  and as it moves up (``ahead``: requests that run before it, the running one included; 0:
  it is next; an experiment's later requests may queue again); ``{"type": "started"}`` once,
  before any progress; ``{"type": "progress", "done", "total", ...}`` as work completes
  (``unit``: ``ex`` for dataset examples, or an experiment's steps; ``tokens``/``elapsed``/
  ``eta`` for dataset runs); and
  ``{"type": "done", "ok": bool, "elapsed": s}`` last, once.
- ``False`` or ``None``: nothing at all.
- a :class:`Progress` (what an experiment passes down): report to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from cloche.errors import UsageError

__all__ = ["DELAY_S", "KEEP_S", "Progress", "ProgressArg", "silenced"]

log = logging.getLogger(__name__)

#: seconds a call runs before its bar is drawn (a queued request shows at once)
DELAY_S = 1.0
#: a bar up for at least this many seconds stays when its call ends; a shorter one disappears
KEEP_S = 10.0
#: how often a drawn bar is redrawn (its counts and elapsed time)
TICK_S = 0.5

_CURRENT: contextvars.ContextVar[Progress | None] = contextvars.ContextVar(
    "cloche_progress", default=None)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """No bars inside: what a server wraps around the requests it executes (callbacks given
    explicitly still receive their events)."""
    token = _CURRENT.set(Progress(False, ""))
    try:
        yield
    finally:
        _CURRENT.reset(token)


class Progress:
    """The progress of one call (see the module docstring for what ``progress`` may be).

    Feed it the call's events (``reporter(event)``: what an executor emits, or what a nested
    call's reporter forwards); an experiment that counts steps calls :meth:`expect` and
    :meth:`step`. Use it as a context manager (``with Progress(progress, "name") as p:``): inside,
    calls made with the default ``progress=True`` report to it; leaving it sends ``done``.

    Events only update the reporter's state (they may arrive on a connection's reader thread);
    the bar is drawn by one shared ticker thread, and by the caller when the call ends.
    """

    def __init__(self, progress: ProgressArg, desc: str, *, unit: str = "it") -> None:
        if not (progress is None or isinstance(progress, (bool, Progress)) or callable(progress)):
            raise UsageError(f"progress is True (a bar), False, or a callable that receives"
                             f" event dicts, not {progress!r}")
        self._desc, self._unit = desc, unit
        self._parent: Progress | None = None
        self._callback: Callable[[dict[str, Any]], None] | None = None
        self._want_bar = False
        if isinstance(progress, Progress):
            self._parent = progress
        elif progress is True:
            self._parent = _CURRENT.get()
            self._want_bar = self._parent is None
        elif callable(progress):
            self._callback = progress
        self._lock = threading.Condition(threading.RLock())
        self._t0 = time.monotonic()
        self._total: int | None = None  # steps, when the call counts its own
        self._done = 0
        #: (done, total, tokens, unit) of counted work reported by the executor or a nested call
        self._count: tuple[int, Any, Any, str] | None = None
        self._inner: str = ""  # a nested pass's count, shown beside the steps
        self._started = self._closed = False
        self._queued: int | None = None
        self._bar: Any = None
        self._shown_at: float | None = None
        self._drawer: threading.Thread | None = None
        self._token: contextvars.Token[Progress | None] | None = None
        if self._want_bar:
            if DELAY_S <= 0:
                self._show()
            if _text_bars_in_a_notebook():
                self._drawer = threading.Thread(target=self._draw_loop, name="cloche-progress",
                                                daemon=True)
                self._drawer.start()
            else:
                _TICKER.add(self)

    @staticmethod
    def current() -> Progress | None:
        """The reporter that calls made here report to by default (``None``: none is active)."""
        return _CURRENT.get()

    # ----------------------------------------------------------------- use as a context
    def __enter__(self) -> Progress:
        self._token = _CURRENT.set(self)
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._token is not None:
            _CURRENT.reset(self._token)
            self._token = None
        self.close(ok=exc_type is None)

    @property
    def wanted_events(self) -> str:
        """Which of a server's events this reporter shows: ``"all"`` (a callback gets every
        one), ``"shown"`` (a bar: queue positions behind others, progress counts) or
        ``"none"``. A remote executor asks the server for only these (fewer frames)."""
        if self._parent is not None:
            return self._parent.wanted_events
        if self._callback is not None:
            return "all"
        return "shown" if self._want_bar else "none"

    # ----------------------------------------------------------------- events in
    def begin(self) -> None:
        """The call started working (for work in this process, which never queues)."""
        self._event({"type": "started"})

    def expect(self, total: int, unit: str | None = None) -> None:
        """The call will take ``total`` steps (an experiment's passes, layers, units)."""
        with self._lock:
            self._total = int(total)
            if unit is not None:
                self._unit = unit

    def step(self, n: int = 1) -> None:
        """``n`` more steps are done."""
        with self._lock:
            self._done += n
            self._inner = ""
            event = {"type": "progress", "done": self._done, "total": self._total,
                     "unit": self._unit}
        self._event(event)

    def __call__(self, event: dict[str, Any]) -> None:
        """An event of this call (from its executor) or of a call made inside it."""
        kind = event.get("type")
        if kind == "progress" and self._total is not None:
            # a pass inside a call that counts its own steps: shown beside them, not as them
            with self._lock:
                if event.get("total"):
                    self._inner = f"{event.get('done')}/{event['total']}"
                    self._lock.notify_all()
            return
        if kind in ("queued", "started", "progress"):
            self._event(event)

    def _event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        with self._lock:
            if self._closed:
                return
            if kind in ("started", "progress"):
                first = not self._started
                self._started, self._queued = True, None
                if first:
                    self._emit({"type": "started"})
                if kind == "started":
                    self._lock.notify_all()
                    return
            if kind == "queued":
                self._queued = int(event.get("ahead", event.get("position")) or 0)
                if self._queued and self._drawer is None and self._want_bar:
                    _TICKER.wake()  # behind others: up at once, not at the next tick
            if kind == "progress" and self._total is None and event.get("done") is not None:
                event = {**event, "unit": event.get("unit") or self._unit}
                self._count = (int(event["done"]), event.get("total"), event.get("tokens"),
                               event["unit"])
            self._emit(dict(event))
            self._lock.notify_all()

    def _emit(self, event: dict[str, Any]) -> None:
        if self._parent is not None:
            self._parent(event)
        elif self._callback is not None:
            self._call_back(event)

    def _call_back(self, event: dict[str, Any]) -> None:
        """The user's callback sees ``event``; if it raises, the call goes on (its own result or
        error is what the caller gets) and the traceback is logged, as for remote events."""
        assert self._callback is not None
        try:
            self._callback(event)
        except Exception:
            log.exception("the progress callback raised on a %r event", event.get("type"))

    # ----------------------------------------------------------------- the bar
    def describe(self) -> str:
        """The bar's description now: the call's name, and its place in a queue if it waits."""
        with self._lock:
            if self._queued is None:
                return self._desc
            where = "next" if not self._queued else f"{self._queued} ahead"
            return f"{self._desc} (queued: {where})"

    def due(self) -> bool:
        """Whether a bar should be up now: one is wanted, and the call outlived the delay or
        waits behind others in a queue."""
        with self._lock:
            return self._want_bar and not self._closed and (
                self._bar is not None or bool(self._queued)
                or time.monotonic() - self._t0 >= DELAY_S)

    def _show(self) -> None:
        from tqdm.auto import tqdm

        with self._lock:
            if self._bar is None:
                # (tqdm's set_description adds the ": " that this format leaves out)
                self._bar = tqdm(total=None, desc=f"{self.describe()}: ", unit=self._unit,
                                 leave=True, bar_format="{desc}{elapsed}{postfix}")
                self._shown_at = time.monotonic()
        self._render()

    def _render(self) -> None:
        """Bring the bar up to the state (from the drawer thread or the caller's)."""
        with self._lock:
            bar = self._bar
            if bar is None:
                return
            done, total, postfix, unit = self._done, self._total, self._inner, self._unit
            if total is None and self._count is not None:
                done, total, tokens, unit = self._count
                postfix = f"tokens={tokens}" if tokens is not None else ""
            counted = total is not None or self._count is not None
            if counted and bar.bar_format is not None:
                bar.bar_format = None
            bar.unit = unit
            if total is not None and bar.total != total:
                bar.total = total
            if done != bar.n:
                bar.update(done - bar.n)  # (through update: tqdm's rate estimate follows)
            bar.set_postfix_str(postfix, refresh=False)
            bar.set_description(self.describe(), refresh=False)
            bar.refresh()

    def _tick(self) -> None:
        """Put the bar up once it is due; redraw it once it is up."""
        with self._lock:
            if self._closed:
                return
            if self._bar is None:
                if self.due():
                    self._show()
            else:
                self._render()

    def _draw_loop(self) -> None:
        """A call's own drawer (see :func:`_text_bars_in_a_notebook`): ticks on events and
        on time, until the call ends."""
        with self._lock:
            while not self._closed:
                self._tick()
                wait = TICK_S if self._bar is not None else DELAY_S - (
                    time.monotonic() - self._t0)
                self._lock.wait(max(wait, 0.0))

    @property
    def bar(self) -> Any:
        """The tqdm bar, once drawn (``None`` before, and when none is wanted)."""
        return self._bar

    # ----------------------------------------------------------------- the end
    def close(self, ok: bool = True) -> None:
        """The call ended: send ``done`` (once) and take the bar down (or leave it, if long)."""
        with self._lock:
            if self._closed:
                return
            if ok and not self._started:
                self._started = True
                self._emit({"type": "started"})
            elapsed = time.monotonic() - self._t0
            if self._parent is None and self._callback is not None:
                self._call_back({"type": "done", "ok": bool(ok), "elapsed": elapsed})
            self._closed = True
            self._lock.notify_all()
        _TICKER.remove(self)
        if self._drawer is not None and self._drawer is not threading.current_thread():
            self._drawer.join()
        self._render()  # the final counts, drawn by the caller
        with self._lock:
            bar, self._bar = self._bar, None
        if bar is not None:
            bar.leave = time.monotonic() - (self._shown_at or self._t0) >= KEEP_S
            bar.close()


def _text_bars_in_a_notebook() -> bool:
    """Whether bars are text in a Jupyter kernel (tqdm without ipywidgets). Such a kernel sends
    a thread's output to the cell that started the thread, so there each call draws from a
    thread of its own, started in its cell (the shared ticker would write into the cell that
    started it). Widgets are displayed in the running cell from any thread: shared is fine."""
    if "ipykernel" not in sys.modules:
        return False
    from tqdm import notebook
    from tqdm.auto import tqdm

    return tqdm is not notebook.tqdm


class _Ticker:
    """One daemon thread, started on first need, that ticks every reporter that wants a bar:
    it puts a bar up once its call is due and keeps it current. One thread for all, so that a
    loop of quick calls starts no thread per call."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: weakref.WeakSet[Progress] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def add(self, reporter: Progress) -> None:
        with self._cond:
            self._active.add(reporter)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="cloche-progress",
                                                daemon=True)
                self._thread.start()

    def remove(self, reporter: Progress) -> None:
        with self._cond:
            self._active.discard(reporter)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._active:
                    self._cond.wait()
                self._cond.wait(min(TICK_S, max(DELAY_S, 0.05)) / 2)
                reporters = list(self._active)
            for reporter in reporters:
                reporter._tick()


_TICKER = _Ticker()

#: what ``progress=`` accepts
ProgressArg = bool | None | Callable[[dict[str, Any]], None] | Progress
