"""Prometheus metrics of one app: `ServerMetrics`, `EngineCollector`, `RequestMetricsMiddleware`.

Each app has its own `CollectorRegistry`, never prometheus_client's global
one, so that many apps in one process (tests) do not collide.

Names follow Prometheus' conventions (and vLLM's where it has the metric):
the `kvengine_` prefix, units as a suffix (`_bytes`, `_seconds`), counters
ending in `_total`, a fraction ending in `_ratio`; every metric carries a
`model_name` label, the name the server serves its model under.

The engine's gauges and counters are read at scrape time from a stats
snapshot (`AsyncEngine.stats()`: `Engine.stats()` as its driver took it
between steps), never from the engine itself, which may be in the middle of a
step in a worker thread: a scrape sees whole steps only. `ENGINE_METRICS`
names and describes each stats key; a key the engine adds later is still
exported, as `kvengine_<key>` (a counter if it ends in `_total`), until it
gets its entry there.

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
LABEL = "model_name"
# Seconds. Wide enough for a 135M model on a CPU (slow) and a GPU (fast).
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

# Engine stats key -> (metric name without the prefix, help). Keys ending in `_total` are counters.
ENGINE_METRICS: dict[str, tuple[str, str]] = {
    "prompt_tokens_total": ("prompt_tokens_total", "Prompt tokens of the requests queued in the engine"),
    "prefill_tokens_total": (
        "prefill_tokens_total",
        "Prompt tokens computed by forward passes (not reused from the prefix cache)",
    ),
    "requests_running": ("requests_running", "Requests being prefilled or decoded"),
    "requests_waiting": ("requests_waiting", "Requests queued, waiting for KV memory or a running slot"),
    "preemptions_total": ("preemptions_total", "Requests preempted: their blocks freed, to be recomputed"),
    "pool_blocks": ("kv_pool_blocks", "KV blocks in the pool"),
    "pool_blocks_used": ("kv_pool_blocks_used", "KV blocks referenced, by requests or by the prefix cache"),
    "pool_blocks_free": ("kv_pool_blocks_free", "KV blocks no one references"),
    "pool_blocks_cached": ("kv_pool_blocks_cached", "KV blocks only the prefix cache holds (evictable)"),
    "pool_bytes_used": ("kv_pool_used_bytes", "KV memory in referenced blocks"),
    "pool_bytes_capacity": ("kv_pool_capacity_bytes", "KV memory the pool holds in all"),
    "prefix_hit_tokens_total": (
        "prefix_cache_hits_total",
        "Prompt tokens found in the prefix cache at admission (pool or storage tiers)",
    ),
    "prefix_tier_hit_tokens_total": (
        "prefix_cache_tier_hits_total",
        "Prompt tokens of prefix-cache hits whose blocks were loaded from a storage tier",
    ),
    "prefix_evicted_blocks_total": (
        "prefix_cache_evicted_blocks_total",
        "KV blocks the prefix cache evicted",
    ),
    "compressions_total": ("compressions_total", "Contexts compressed by a press"),
    "compression_bytes_saved_total": (
        "compression_freed_bytes_total",
        "KV memory freed by compressing contexts",
    ),
    "decode_compressions_total": ("decode_compressions_total", "Compressions by decoding-time presses"),
    "compressed_prefix_entries": ("compressed_prefix_entries", "Compressed contexts kept for later requests"),
    "compressed_prefix_hits_total": (
        "compressed_prefix_hits_total",
        "Requests that reused a kept compressed context (no prefill, no compression)",
    ),
    "compressed_prefix_stores_total": ("compressed_prefix_stores_total", "Compressed contexts kept"),
    "compressed_prefix_evictions_total": (
        "compressed_prefix_evictions_total",
        "Kept compressed contexts evicted",
    ),
    "tier_loaded_chunks_total": ("tier_loaded_chunks_total", "Prompt chunks loaded from the storage tiers"),
    "tier_misses_total": ("tier_misses_total", "Prompt chunks looked up in the storage tiers and not found"),
    "tier_stored_chunks_total": ("tier_stored_chunks_total", "Prompt chunks written to the storage tiers"),
    "tier_stored_blobs_total": ("tier_stored_blobs_total", "Blobs written to the storage tiers"),
    "tier_staged_chunks": ("tier_staged_chunks", "Chunks read from the tiers, waiting for their request"),
    "tier_staged_dropped_total": (
        "tier_staged_dropped_total",
        "Chunks read from the tiers and dropped unused (their request left or was refused)",
    ),
    "tier_faults_corrupt_total": (
        "tier_faults_corrupt_total",
        "Tier blobs rejected as unreadable or changed",
    ),
    "tier_faults_unauthenticated_total": (
        "tier_faults_unauthenticated_total",
        "Tier blobs rejected as written without the shared secret",
    ),
    "tier_faults_mismatch_total": (
        "tier_faults_mismatch_total",
        "Tier blobs rejected as written for another key",
    ),
    "tier_faults_error_total": ("tier_faults_error_total", "Tier blobs rejected for another reason"),
}
_TIER_STATS = {
    "hits": "blobs found",
    "misses": "blobs looked up and not found",
    "stores": "blobs written",
    "evictions": "blobs evicted",
    "errors": "I/O or network failures",
}


def describe(key: str) -> tuple[str, str]:
    """(metric name without the prefix, help) of an engine stats key, known or not."""
    if key in ENGINE_METRICS:
        return ENGINE_METRICS[key]
    tier, _, stat = key.removeprefix("tier_").removesuffix("_total").rpartition("_")
    if key.startswith("tier_") and key.endswith("_total") and stat in _TIER_STATS:
        return key, f"Storage tier {tier}: {_TIER_STATS[stat]}"
    return key, f"Engine statistic {key!r} (no description yet)"


EngineStats = Callable[[], Mapping[str, float]]  # the engine's latest stats snapshot


class EngineCollector(Collector):
    """The engine's stats snapshot at scrape time, plus the derived ones.

    Derived: `kvengine_kv_cache_usage_ratio` (vLLM's kv_cache_usage_perc: the
    fraction of the pool's blocks that requests hold; blocks only the prefix
    cache holds count as free, since it evicts them on demand) and
    `kvengine_prefix_cache_queries_total` (prompt tokens looked up in the
    prefix cache; with `kvengine_prefix_cache_hits_total`, a hit rate over
    any window). A stats key whose metric name the server already defines
    (in `reserved`, family names without `_total`) is skipped: the server's
    own count wins and no family is exported twice.
    """

    def __init__(self, stats: EngineStats, model_name: str, reserved: frozenset[str] = frozenset()) -> None:
        self.stats = stats
        self.model_name = model_name
        self.reserved = reserved

    def collect(self) -> Iterator[Metric]:
        stats = self.stats()
        for key, value in sorted(stats.items()):
            name, help_text = describe(key)
            yield from self._family(name, help_text, value)
        blocks = stats.get("pool_blocks", 0)
        held = stats.get("pool_blocks_used", 0) - stats.get("pool_blocks_cached", 0)
        yield from self._family(
            "kv_cache_usage_ratio",
            "Fraction of the KV pool's blocks held by requests (0 to 1)",
            held / blocks if blocks else 0.0,
        )
        yield from self._family(
            "prefix_cache_queries_total",
            "Prompt tokens looked up in the prefix cache (those of every queued request)",
            stats.get("prompt_tokens_total", 0),
        )

    def _family(self, name: str, help_text: str, value: float) -> Iterator[Metric]:
        counter = name.endswith("_total")
        base = PREFIX + (name.removesuffix("_total") if counter else name)
        if base in self.reserved:
            return
        family = CounterMetricFamily if counter else GaugeMetricFamily
        metric = family(base, help_text, labels=[LABEL])
        metric.add_metric([self.model_name], value)
        yield metric


class ServerMetrics:
    """The app's registry: per-request counters and latencies, requests in flight, the engine's stats.

    Prompt tokens and prefix-cache hits are the engine's (every prompt the
    server runs goes through the engine, which counts it on admission); the
    server adds what only it sees. `engine_stats` returns the engine's latest
    stats snapshot (`AsyncEngine.stats`); `model_name` labels every metric.
    """

    def __init__(self, engine_stats: EngineStats, num_in_flight: Callable[[], int], model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            PREFIX + "requests",
            "HTTP responses, by route and status code",
            [LABEL, "route", "status"],
            registry=r,
        )
        self.model_name = model_name
        self.completion_tokens = Counter(
            PREFIX + "completion_tokens", "Tokens generated for requests", [LABEL], registry=r
        ).labels(model_name)
        self.ttft = _histogram(
            r, "time_to_first_token_seconds", "From accepting a request to its first token", _TTFT_BUCKETS
        ).labels(model_name)
        self.itl = _histogram(
            r, "inter_token_latency_seconds", "Between consecutive tokens of a request", _ITL_BUCKETS
        ).labels(model_name)
        self.e2e = _histogram(
            r,
            "e2e_request_latency_seconds",
            "From accepting a request to its last token (requests that ran to the end)",
            _E2E_BUCKETS,
        ).labels(model_name)
        in_flight = Gauge(
            PREFIX + "requests_in_flight", "HTTP completion requests being answered", [LABEL], registry=r
        )
        in_flight.labels(model_name).set_function(lambda: float(num_in_flight()))
        reserved = frozenset(family.name for family in r.collect())
        r.register(EngineCollector(engine_stats, model_name, reserved))

    def count_response(self, route: str, status: int) -> None:
        self.requests.labels(self.model_name, route, str(status)).inc()

    def timer(self, arrival: float) -> RequestTimer:
        return RequestTimer(self, arrival)

    def render(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)


def _histogram(
    registry: CollectorRegistry, name: str, help_text: str, buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(PREFIX + name, help_text, [LABEL], buckets=buckets, registry=registry)


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

    def end(self, num_completion: int, ran_to_end: bool) -> None:
        """The request is over; an aborted one counts its tokens but not its latency."""
        self.metrics.completion_tokens.inc(num_completion)
        if ran_to_end:
            self.metrics.e2e.observe(time.monotonic() - self.arrival)


class RequestMetricsMiddleware:
    """ASGI middleware counting each HTTP response in `kvengine_requests_total{model_name,route,status}`.

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
            self.metrics.count_response(route, status)
