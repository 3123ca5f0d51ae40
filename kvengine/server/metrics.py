"""Prometheus metrics of one app: `ServerMetrics`, `EngineCollector`, `RequestMetricsMiddleware`.

Each app has its own `CollectorRegistry`, never prometheus_client's global
one, so that many apps in one process (tests) do not collide.

The engine's gauges and counters are read at scrape time from a stats
snapshot (`AsyncEngine.stats()`: `Engine.stats()` as its driver took it
between steps), never from the engine itself, which may be in the middle of a
step in a worker thread: a scrape sees whole steps only. A key ending in
`_total` becomes a counter, any other key a gauge, each named
`kvengine_<key>`, so keys the engine adds later are exported with no change
here.

This module does not decide who may scrape: /metrics is open (see ServerConfig).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "kvengine_"
# Seconds. Wide enough for a 135M model on a CPU (slow) and a GPU (fast).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


EngineStats = Callable[[], Mapping[str, float]]  # the engine's latest stats snapshot


class EngineCollector(Collector):
    """The engine's stats snapshot at scrape time, plus the derived `kvengine_prefix_hit_rate`.

    A stats key whose metric name the server already defines (in `reserved`,
    family names without `_total`) is skipped: the server's own count wins and
    no family is exported twice.
    """

    def __init__(self, stats: EngineStats, reserved: frozenset[str] = frozenset()) -> None:
        self.stats = stats
        self.reserved = reserved

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, value in sorted(stats.items()):
            counter = key.endswith("_total")
            name = PREFIX + (key[: -len("_total")] if counter else key)
            if name in self.reserved:
                continue
            help_text = f"Engine.stats()[{key!r}]"
            if counter:
                yield CounterMetricFamily(name, help_text, value=value)
            else:
                yield GaugeMetricFamily(name, help_text, value=value)
        prompt = stats.get("prompt_tokens_total", 0)
        rate = stats.get("prefix_hit_tokens_total", 0) / prompt if prompt else 0.0
        yield GaugeMetricFamily(
            PREFIX + "prefix_hit_rate",
            "prompt tokens reused from the prefix cache / prompt tokens",
            value=rate,
        )


class ServerMetrics:
    """The app's registry: per-request counters and latencies, requests in flight, the engine's stats.

    Prompt tokens are the engine's `kvengine_prompt_tokens_total` (every
    prompt the server runs goes through the engine, which counts it on
    admission); the server adds what only it sees. `engine_stats` returns the
    engine's latest stats snapshot (`AsyncEngine.stats`).
    """

    def __init__(self, engine_stats: EngineStats, num_in_flight: Callable[[], int]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests", "HTTP responses, by route and status code", ["route", "status"], registry=r
        )
        self.completion_tokens = Counter(
            PREFIX + "completion_tokens", "tokens generated for requests", registry=r
        )
        self.cached_prompt_tokens = Counter(
            PREFIX + "cached_prompt_tokens", "prompt tokens served from the prefix cache", registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "from accepting a request to its first token",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "between consecutive tokens of a request",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "from accepting a request to its last token (requests that ran to the end)",
            buckets=_E2E_BUCKETS,
            registry=r,
        )
        in_flight = Gauge(
            PREFIX + "requests_in_flight", "HTTP completion requests being answered", registry=r
        )
        in_flight.set_function(lambda: float(num_in_flight()))
        reserved = frozenset(family.name for family in r.collect())
        r.register(EngineCollector(engine_stats, reserved))

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestTimer:
    """Latencies and token counts of one request, reported to `ServerMetrics` as it runs.

    `arrival` is a `time.monotonic()` reading taken when the request was accepted.
    """

    def __init__(self, metrics: ServerMetrics, arrival: float) -> None:
        self.metrics = metrics
        self.arrival = arrival
        self.last_token_at: float | None = None

    def token(self) -> None:
        """One token came out of the engine."""
        now = time.monotonic()
        if self.last_token_at is None:
            self.metrics.ttft.observe(now - self.arrival)
        else:
            self.metrics.itl.observe(now - self.last_token_at)
        self.last_token_at = now

    def end(self, num_completion: int, num_cached: int, ran_to_end: bool) -> None:
        """The request is over; an aborted one counts its tokens but not its latency."""
        self.metrics.completion_tokens.inc(num_completion)
        self.metrics.cached_prompt_tokens.inc(num_cached)
        if ran_to_end:
            self.metrics.e2e.observe(time.monotonic() - self.arrival)


class RequestMetricsMiddleware:
    """ASGI middleware counting each HTTP response in `kvengine_requests_total{route,status}`.

    `route` is the request path when it is one of `routes`, else "other", so
    that requests for random paths cannot grow the label set without bound.
    A request that ends in an exception before any response is counted as 500.
    Pure ASGI (not BaseHTTPMiddleware) so that streams and disconnects pass through untouched.
    """

    def __init__(self, app: Any, metrics: ServerMetrics, routes: frozenset[str]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500

        async def send_and_note(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
