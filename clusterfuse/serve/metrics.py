"""Prometheus metrics of the server, in the text exposition format (``GET /metrics``).

Request counters, token counters and latency histograms are updated by the routes as requests
progress; the engine's state (queue depth, KV pages, preemptions) is read from ``AsyncLLM.stats()``
at scrape time.  Everything lives in the server's own registry, not prometheus_client's global one,
so several servers (tests) in one process do not share counts.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

#: The content type of the text exposition format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_PREFIX = "clusterfuse"
# Seconds. TTFT spans a queue wait plus a prefill (ms on a GPU, seconds on a CPU or under load);
# inter-token latency is one decode step (a few ms on a GPU, more on a CPU).
_TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_ITL_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25,
                0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)


class _ThroughputWindow:
    """Generated tokens per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = 10.0) -> None:
        self.window_s = window_s
        self._events: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, n: int, now: float) -> None:
        self._events.append((now, n))

    def rate(self, now: float) -> float:
        while self._events and self._events[0][0] < now - self.window_s:
            self._events.popleft()
        return sum(n for _, n in self._events) / self.window_s


class _EngineCollector(Collector):
    """The engine's state, read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], Any], throughput: _ThroughputWindow) -> None:
        self._stats = stats
        self._throughput = throughput

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(f"{_PREFIX}_requests_running", "Requests being decoded (in the batch).",
                                value=s.running)
        yield GaugeMetricFamily(f"{_PREFIX}_requests_waiting", "Requests queued for admission.", value=s.waiting)
        yield GaugeMetricFamily(f"{_PREFIX}_kv_pages_used", "KV-cache pages held by requests.", value=s.kv_pages_used)
        yield GaugeMetricFamily(f"{_PREFIX}_kv_pages_total", "KV-cache pages in the pool.", value=s.kv_pages_total)
        yield CounterMetricFamily(f"{_PREFIX}_preemptions", "Requests preempted (pages freed, recomputed later).",
                                  value=s.preemptions)
        yield GaugeMetricFamily(f"{_PREFIX}_generation_tokens_per_second",
                                f"Tokens generated per second over the last {self._throughput.window_s:g} s.",
                                value=self._throughput.rate(time.monotonic()))


class ServerMetrics:
    """The metrics of one server."""

    def __init__(self, stats: Callable[[], Any]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(f"{_PREFIX}_requests", "HTTP requests finished, by route and status code "
                                "(499: the client went away first).", ["route", "status"], registry=r)
        self.finished = Counter(f"{_PREFIX}_request_finish", "Generations finished, by reason.", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter(f"{_PREFIX}_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter(f"{_PREFIX}_generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(f"{_PREFIX}_time_to_first_token_seconds", "From arrival to the first generated token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.itl = Histogram(f"{_PREFIX}_inter_token_latency_seconds", "Time between generated tokens of a request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{_PREFIX}_request_latency_seconds", "From arrival to the last token.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.throughput = _ThroughputWindow()
        r.register(_EngineCollector(stats, self.throughput))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Feeds one request's token arrivals into the latency histograms and token counters."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self._m = metrics
        self._last: float | None = None  # when the previous tokens arrived (time.monotonic())

    def tokens(self, n: int, arrival_s: float, first_token_s: float | None) -> None:
        """``n`` new tokens arrived now; ``arrival_s`` / ``first_token_s`` are the engine's timings."""
        if n <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._m.ttft.observe(max(0.0, (first_token_s or now) - arrival_s))
            n_gaps, since = n - 1, first_token_s or now
        else:
            n_gaps, since = n, self._last
        # Tokens that came together (a detokenizer that held text back) share the gap evenly.
        for _ in range(n_gaps):
            self._m.itl.observe(max(0.0, now - since) / max(n_gaps, 1))
        self._last = now
        self._m.generation_tokens.inc(n)
        self._m.throughput.add(n, now)

    def finished(self, reason: str | None, prompt_tokens: int, arrival_s: float, finished_s: float | None) -> None:
        self._m.finished.labels(reason or "abort").inc()
        self._m.prompt_tokens.inc(prompt_tokens)
        self._m.e2e.observe(max(0.0, (finished_s or time.monotonic()) - arrival_s))
