"""What ``/metrics`` reports, in Prometheus text through ``prometheus_client``.

Latency histograms named as vLLM names them (``time_to_first_token_seconds``,
``time_per_output_token_seconds``, ``request_queue_time_seconds``, ``e2e_request_latency_seconds``,
prefixed ``mtpspec_``), request and token counters, and the speculative counters of the one
metrics convention (``SpecStats``: draft tokens proposed and accepted, per position, tau).
Each server has its own registry, so several servers in one process (the tests) never mix.

Must not: block the engine thread (updates are a lock and a few additions).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mtpspec.metrics import SpecStats
from mtpspec.sequence import GenerationResult

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   7.5, 10.0, 20.0, 40.0, 80.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.4, 0.5, 0.75, 1.0, 2.5)
Gauges = Callable[[], dict[str, tuple[str, str, float]]]  # name -> (kind, help, value)


class ServeMetrics:
    """Counters and histograms of one server, safe to update from any thread."""

    def __init__(self, gauges: Gauges):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}  # (endpoint, status) -> count
        self.stats = SpecStats()        # summed over finished sequences
        self.completion_tokens = 0
        self.finished = 0
        self.cancelled = 0
        self.failed = 0
        self.registry = CollectorRegistry()
        histogram = lambda name, help_, buckets: Histogram(  # noqa: E731
            f"mtpspec_{name}", help_, buckets=buckets, registry=self.registry)
        self.ttft = histogram("time_to_first_token_seconds",
                              "Time from submission to the first token.", LATENCY_BUCKETS)
        self.tpot = histogram("time_per_output_token_seconds",
                              "Mean time between output tokens of a request, after the first.",
                              TOKEN_BUCKETS)
        self.queue = histogram("request_queue_time_seconds",
                               "Time from submission to the start of the request's prefill.",
                               LATENCY_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Time from submission to the last token.", LATENCY_BUCKETS)
        self.registry.register(_Counters(self, gauges))

    def count_request(self, endpoint: str, status: int) -> None:
        with self._lock:
            key = (endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_finished(self, result: GenerationResult, ttft: float, e2e: float) -> None:
        """A finished sequence and its latencies in seconds (from its submission)."""
        with self._lock:
            self.stats = self.stats.merge(result.stats)
            self.completion_tokens += len(result.token_ids)
            self.finished += 1
        self.ttft.observe(ttft)
        self.e2e.observe(e2e)
        self.queue.observe(max(0.0, ttft - result.stats.prefill_s))
        if len(result.token_ids) > 1:
            self.tpot.observe((e2e - ttft) / (len(result.token_ids) - 1))

    def count_cancelled(self) -> None:
        with self._lock:
            self.cancelled += 1

    def count_failed(self) -> None:
        with self._lock:
            self.failed += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Counters:
    """A custom collector: the counters above and the caller's gauges, read at scrape time."""

    def __init__(self, metrics: ServeMetrics, gauges: Gauges):
        self.metrics, self.gauges = metrics, gauges

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        with m._lock:
            requests = sorted(m.requests.items())
            stats, finished, cancelled, failed = m.stats, m.finished, m.cancelled, m.failed
            completion_tokens = m.completion_tokens
        family = CounterMetricFamily("mtpspec_requests", "HTTP requests answered, by endpoint "
                                     "and status.", labels=["endpoint", "status"])
        for (endpoint, status), n in requests:
            family.add_metric([endpoint, str(status)], n)
        yield family
        plain = [
            ("sequences_finished", "Generations that ran to a stop.", finished),
            ("sequences_cancelled", "Generations stopped because the client went away.", cancelled),
            ("sequences_failed", "Generations failed by an error while serving them.", failed),
            ("prompt_tokens", "Prompt tokens of finished generations.", stats.prompt_tokens),
            ("generation_tokens", "Tokens returned to clients.", completion_tokens),
            ("verification_steps", "Target verification steps, summed over sequences (tau's "
             "denominator).", stats.steps),
            ("verified_tokens", "Tokens produced by verification steps (accepted drafts + bonus).",
             stats.generated),
            ("draft_tokens_proposed", "Draft tokens sent to verification (vLLM's "
             "spec_decode_num_draft_tokens).", stats.draft_proposed),
            ("draft_tokens_accepted", "Draft tokens accepted (vLLM's "
             "spec_decode_num_accepted_tokens).", stats.draft_accepted),
        ]
        for name, help_, value in plain:
            yield CounterMetricFamily(f"mtpspec_{name}", help_, value=value)
        for name, help_, values in (
                ("draft_tokens_proposed_at_position", "Draft tokens proposed at each draft "
                 "position (1-based).", stats.proposed_at),
                ("draft_tokens_accepted_at_position", "Draft tokens accepted at each draft "
                 "position (1-based).", stats.accepted_at)):
            family = CounterMetricFamily(f"mtpspec_{name}", help_, labels=["position"])
            for i, n in enumerate(values):
                family.add_metric([str(i + 1)], n)
            yield family
        family = GaugeMetricFamily("mtpspec_acceptance_rate_at_position",
                                   "Accepted / proposed draft tokens at each draft position.",
                                   labels=["position"])
        for i, rate in enumerate(stats.acceptance_per_position):
            family.add_metric([str(i + 1)], rate)
        yield family
        yield GaugeMetricFamily("mtpspec_mean_acceptance_length",
                                "Tokens per verification step, bonus token included (tau).",
                                value=stats.tau)
        for name, (kind, help_, value) in self.gauges().items():
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield cls(f"mtpspec_{name}", help_, value=value)
