"""One background thread that owns a ``BatchSession``; request threads submit work and read events.

The server's HTTP handlers run in many threads; the engine (model, caches, proposer) must be
driven by exactly one. ``Scheduler.submit`` checks a request (in the caller's thread, so errors
reach the client at once) and hands it to the engine thread through a queue; the engine thread
admits it at the next step boundary and puts each ``TokenEvent``/``FinishEvent`` of that sequence
on the request's own ``Ticket.events`` queue. ``cancel`` (a client went away) frees the row
before the next step. ``ServeMetrics`` keeps the counters ``/metrics`` reports.

Must not: touch the session from any other thread, or block the engine thread on a client.
"""
from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, field

from mtpspec.batch import BatchSession
from mtpspec.metrics import SpecStats
from mtpspec.sequence import FinishEvent, GenerateOptions, GenerationResult


class ServerBusyError(RuntimeError):
    """Too many requests are waiting for a batch row."""


@dataclass
class EngineFailure:
    """The engine thread hit an error while this request was in the batch."""

    message: str


@dataclass
class Ticket:
    """A submitted request: the prompt, its options, and the queue its events arrive on."""

    prompt: list[int]
    options: GenerateOptions
    events: queue.Queue = field(default_factory=queue.Queue)  # TokenEvent | FinishEvent | EngineFailure
    seq_id: int | None = None  # set by the engine thread when the session accepts it


class ServeMetrics:
    """Counters for ``/metrics`` (Prometheus text format), safe to update from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.stats = SpecStats()        # summed over finished sequences
        self.completion_tokens = 0
        self.finished = 0
        self.cancelled = 0

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_finished(self, result: GenerationResult) -> None:
        with self._lock:
            self.stats = self.stats.merge(result.stats)
            self.completion_tokens += len(result.token_ids)
            self.finished += 1

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def render(self, extra: dict[str, tuple[str, str, float]]) -> str:
        """Prometheus text exposition; ``extra`` adds name -> (kind, help, value) from the caller."""
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP mtpspec_{name} {help_}")
            lines.append(f"# TYPE mtpspec_{name} {kind}")
            for labels, value in samples:
                number = f"{value:.6g}" if isinstance(value, float) else str(value)
                lines.append(f"mtpspec_{name}{labels} {number}")

        with self._lock:
            stats = self.stats
            metric("requests_total", "counter", "HTTP requests answered, by endpoint and status.",
                   [(f'{{endpoint="{e}",status="{s}"}}', n)
                    for (e, s), n in sorted(self.requests.items())])
            metric("sequences_finished_total", "counter", "Generations that ran to a stop.",
                   [("", self.finished)])
            metric("sequences_cancelled_total", "counter",
                   "Generations stopped because the client went away.", [("", self.cancelled)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished generations.",
                   [("", stats.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Tokens returned to clients.",
                   [("", self.completion_tokens)])
            metric("verification_steps_total", "counter",
                   "Target verification steps, summed over sequences (tau's denominator).",
                   [("", stats.steps)])
            metric("verified_tokens_total", "counter",
                   "Tokens produced by verification steps (accepted drafts + bonus).",
                   [("", stats.generated)])
            metric("draft_tokens_proposed_total", "counter", "Draft tokens sent to verification.",
                   [("", stats.draft_proposed)])
            metric("draft_tokens_accepted_total", "counter", "Draft tokens accepted.",
                   [("", stats.draft_accepted)])
            metric("draft_tokens_proposed_at_position_total", "counter",
                   "Draft tokens proposed at each draft position (1-based).",
                   [(f'{{position="{i + 1}"}}', n) for i, n in enumerate(stats.proposed_at)])
            metric("draft_tokens_accepted_at_position_total", "counter",
                   "Draft tokens accepted at each draft position (1-based).",
                   [(f'{{position="{i + 1}"}}', n) for i, n in enumerate(stats.accepted_at)])
            metric("acceptance_rate_at_position", "gauge",
                   "Accepted / proposed draft tokens at each draft position.",
                   [(f'{{position="{i + 1}"}}', float(rate))
                    for i, rate in enumerate(stats.acceptance_per_position)])
            metric("mean_acceptance_length", "gauge",
                   "Tokens per verification step, bonus token included (tau).",
                   [("", float(stats.tau))])
        for name, (kind, help_, value) in extra.items():
            metric(name, kind, help_, [("", value)])
        return "\n".join(lines) + "\n"


class Scheduler:
    """Drives ``session`` from one daemon thread; see the module docstring."""

    def __init__(self, session: BatchSession, max_waiting: int = 256):
        self.session = session
        self.max_waiting = max_waiting
        self.metrics = ServeMetrics()
        self._inbox: queue.Queue = queue.Queue()  # ("add" | "cancel", Ticket) or ("stop", None)
        self._tickets: dict[int, Ticket] = {}  # seq_id -> ticket, engine thread only
        self._pending = 0  # submitted, not yet finished or cancelled
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mtpspec-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return len(self.session.live)

    @property
    def waiting(self) -> int:
        return len(self.session.waiting)

    def submit(self, prompt: list[int], options: GenerateOptions) -> Ticket:
        """Check and queue a request (raises ValueError, CacheFullError or ServerBusyError)."""
        self.session.check(prompt, options)
        with self._lock:
            if self._pending >= self.session.max_batch_size + self.max_waiting:
                raise ServerBusyError(
                    f"{self._pending} requests are already running or waiting; try again later")
            self._pending += 1
        ticket = Ticket(list(prompt), options)
        self._inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request's generation and free its row (no-op once it has finished)."""
        self._inbox.put(("cancel", ticket))

    def close(self, timeout: float = 5.0) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

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
            ticket.seq_id = self.session.add(ticket.prompt, ticket.options)
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
        for event in events:
            ticket = self._tickets.get(event.row)
            if ticket is None:
                continue
            ticket.events.put(event)
            if isinstance(event, FinishEvent):
                del self._tickets[event.row]
                self.metrics.count_finished(event.result)
                self._release()

    def _fail_all(self, message: str) -> None:
        """Tell every request in flight that it failed, and start over with an empty batch."""
        for seq_id, ticket in list(self._tickets.items()):
            self.session.cancel(seq_id)
            ticket.events.put(EngineFailure(message))
            self._release()
        self._tickets.clear()

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1
