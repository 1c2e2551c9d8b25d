"""One background thread that owns a ``BatchSession``; request handlers submit work and get events.

The server's HTTP layer runs on an event loop and a thread pool; the engine (model, caches,
proposer) must be driven by exactly one thread. ``Scheduler.submit`` checks a request (in the
caller's thread, so errors reach the client at once) and hands it to the engine thread through a
queue; the engine thread admits it at the next step boundary and passes each ``TokenEvent`` /
``FinishEvent`` of that sequence (or an ``EngineFailure``) to the ticket's ``deliver`` callback.
``cancel`` (a client went away) frees the row before the next step.

Failures: an error in one request's own work (admission, verification, output) fails that
request alone; an error in the shared target pass fails the requests in flight and the thread
serves on; if the thread dies anyway, ``alive`` turns False (``/health`` answers 503) and the
watchdog restarts it with an empty batch.

Must not: touch the session from any other thread while the engine thread lives, or block the
engine thread on a client.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from mtpspec.batch import BatchSession
from mtpspec.sequence import FailEvent, FinishEvent, GenerateOptions, TokenEvent
from mtpspec.server_metrics import ServeMetrics


class ServerBusyError(RuntimeError):
    """Too many requests are running or waiting for a batch row."""


@dataclass
class EngineFailure:
    """The engine failed this request (its own error, or the shared pass's)."""

    message: str


@dataclass
class Ticket:
    """A submitted request: the prompt, its options, and where its events go."""

    prompt: list[int]
    options: GenerateOptions
    deliver: Callable[[object], None]  # TokenEvent | FinishEvent | EngineFailure; any thread
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    seq_id: int | None = None  # set by the engine thread when the session accepts it


class Scheduler:
    """Drives ``session`` from one daemon thread, watched by another; see the module docstring."""

    def __init__(self, session: BatchSession, max_waiting: int = 256, watchdog_s: float = 0.5):
        self.session = session
        session.isolate_errors = True  # one request's error fails that request alone
        self.max_waiting = max_waiting
        self.watchdog_s = watchdog_s
        self.metrics = ServeMetrics(self._gauges)
        self.restarts = 0
        self._inbox: queue.Queue = queue.Queue()  # ("add" | "cancel", Ticket) or ("stop", None)
        self._tickets: dict[int, Ticket] = {}  # seq_id -> ticket, engine thread only
        self._pending = 0  # submitted, not yet finished, failed or cancelled
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread = self._start_engine()
        self._watchdog = threading.Thread(target=self._watch, name="mtpspec-watchdog", daemon=True)
        self._watchdog.start()

    @property
    def running(self) -> int:
        return len(self.session.live)

    @property
    def waiting(self) -> int:
        return len(self.session.waiting)

    @property
    def alive(self) -> bool:
        """Whether the engine thread is serving (False from its death to its restart)."""
        return self._thread.is_alive()

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, prompt: list[int], options: GenerateOptions,
               deliver: Callable[[object], None]) -> Ticket:
        """Check and queue a request (raises ValueError, CacheFullError or ServerBusyError)."""
        self.session.check(prompt, options)
        with self._lock:
            if self._pending >= self.session.max_batch_size + self.max_waiting:
                raise ServerBusyError(
                    f"{self._pending} requests are already running or waiting; try again later")
            self._pending += 1
        ticket = Ticket(list(prompt), options, deliver)
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request's generation and free its row (no-op once it has finished)."""
        self._inbox.put(("cancel", ticket))

    def close(self, timeout: float = 5.0) -> None:
        self._closed.set()
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    def _gauges(self) -> dict[str, tuple[str, str, float]]:
        session = self.session
        return {
            "requests_running": ("gauge", "Sequences in the batch now.", self.running),
            "requests_waiting": ("gauge", "Sequences waiting for a batch row.", self.waiting),
            "batch_steps_total": ("counter", "Batched target passes after prefill.", session.steps),
            "batch_rows_total": ("counter", "Rows summed over batched target passes (divided by "
                                 "batch_steps_total: the mean batch size).", session.row_steps),
            "max_batch_size": ("gauge", "Sequences decoded together at most.",
                               session.max_batch_size),
            "engine_alive": ("gauge", "1 while the engine thread serves.", float(self.alive)),
            "engine_restarts_total": ("counter", "Engine threads restarted by the watchdog.",
                                      self.restarts),
        }

    # --- the watchdog ------------------------------------------------------------------------

    def _start_engine(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="mtpspec-engine", daemon=True)
        thread.start()
        return thread

    def _watch(self) -> None:
        """Restart a dead engine thread once it has been seen dead on two checks in a row (so
        ``/health`` reports the death for at least one period)."""
        seen_dead = False
        while not self._closed.wait(self.watchdog_s):
            if self._thread.is_alive():
                seen_dead = False
            elif not seen_dead:
                seen_dead = True
            else:
                seen_dead = False
                self._fail_all("the engine thread died; it has been restarted")
                self.restarts += 1
                self._thread = self._start_engine()

    # --- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                command = self._inbox.get(block=self.session.idle)
            except queue.Empty:
                command = None
            while command is not None:
                if command[0] == "stop":
                    self._fail_all("the server is shutting down")
                    return
                self._apply(*command)
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    command = None
            if not self.session.idle:
                self._step()

    def _apply(self, kind: str, ticket: Ticket) -> None:
        if kind == "add":
            try:
                ticket.seq_id = self.session.add(ticket.prompt, ticket.options)
            except Exception as err:  # noqa: BLE001 - this request fails, the others go on
                self._send(ticket, EngineFailure(f"{type(err).__name__}: {err}"))
                self.metrics.count_failed()
                self._release()
                return
            self._tickets[ticket.seq_id] = ticket
        elif ticket.seq_id is not None and self._tickets.pop(ticket.seq_id, None) is not None:
            self.session.cancel(ticket.seq_id)
            self.metrics.count_cancelled()
            self._release()

    def _step(self) -> None:
        try:
            events = self.session.step()
        except Exception as err:  # noqa: BLE001 - fail the requests in flight, keep serving
            traceback.print_exc()
            self._fail_all(f"generation failed: {type(err).__name__}: {err}")
            return
        now = time.perf_counter()
        for event in events:
            ticket = self._tickets.get(event.row)
            if ticket is None:
                continue
            if isinstance(event, TokenEvent):
                if ticket.first_token is None:
                    ticket.first_token = now
                self._send(ticket, event)
                continue
            del self._tickets[event.row]
            self._release()
            if isinstance(event, FailEvent):
                self.metrics.count_failed()
                self._send(ticket, EngineFailure(event.message))
            elif isinstance(event, FinishEvent):
                first = ticket.first_token if ticket.first_token is not None else now
                self.metrics.count_finished(event.result, first - ticket.submitted,
                                            now - ticket.submitted)
                self._send(ticket, event)

    @staticmethod
    def _send(ticket: Ticket, event: object) -> None:
        """Hand an event to the request's handler; a handler that cannot take it is gone."""
        try:
            ticket.deliver(event)
        except RuntimeError:  # its event loop has closed (the server is stopping)
            pass

    def _fail_all(self, message: str) -> None:
        """Tell every request in flight that it failed, and start over with an empty batch."""
        tickets = list(self._tickets.values())
        self._tickets.clear()
        self.session.clear()
        for ticket in tickets:
            self.metrics.count_failed()
            self._send(ticket, EngineFailure(message))
            self._release()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
