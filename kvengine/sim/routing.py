"""Routing replay: a trace over several replicas, each with its own prefix cache, without a model.

Every replica is a `RadixCache` of `capacity_blocks` blocks (LRU), served in
the order of `kvengine.sim.replay.serve_blocks`. A router from
`kvengine.cluster.routing` picks each request's replica from the request's
routing key (the trace's block ids, one tenant) and the replicas' loads. Load
is the number of requests a replica is still serving at the request's arrival
time under a simple time model: a request takes its uncached prompt tokens at
`prefill_tokens_per_s`, then `decode_s_per_token` per output token, and
replicas serve their requests concurrently (continuous batching). The time
model only drives the load-based choices; hit rates are counted as in
`replay`. The cache-aware router's trees are capped at the replicas' capacity
and evict LRU, so they mirror the replicas' caches; in the cluster they are
also corrected by the replicas' reports, which the simulation does not need.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvengine.cache.policy import make_policy
from kvengine.cache.radix import RadixCache
from kvengine.cluster.prefix_tree import RoutingKey
from kvengine.cluster.routing import RouterConfig, make_router
from kvengine.errors import InvalidRequestError
from kvengine.sim.replay import canonical_paths, serve_blocks
from kvengine.sim.trace import BLOCK_TOKENS, TraceRequest


@dataclass(frozen=True)
class TimeModel:
    """How long a simulated request keeps its replica busy."""

    prefill_tokens_per_s: float = 8000.0
    decode_s_per_token: float = 0.02

    def duration_s(self, uncached_tokens: int, output_tokens: int) -> float:
        return uncached_tokens / self.prefill_tokens_per_s + output_tokens * self.decode_s_per_token


@dataclass(frozen=True)
class RoutedResult:
    """Hits and routing decisions of one replay (one router, one replica count, one capacity)."""

    router: str
    num_replicas: int
    capacity_blocks: int
    num_requests: int
    input_tokens: int
    hit_tokens: int
    decisions: dict[str, int] = field(default_factory=dict)
    requests_per_replica: tuple[int, ...] = ()
    mean_load: float = 0.0
    max_load: int = 0

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / max(1, self.input_tokens)


def replay_routed(
    requests: Sequence[TraceRequest],
    num_replicas: int,
    capacity_blocks: int,
    router: str,
    config: RouterConfig | None = None,
    time_model: TimeModel | None = None,
) -> RoutedResult:
    """Serve `requests` (in serving order) over `num_replicas` caches of `capacity_blocks` each."""
    if num_replicas < 1 or capacity_blocks < 1:
        raise InvalidRequestError(
            f"num_replicas and capacity_blocks must be >= 1, got {num_replicas}, {capacity_blocks}"
        )
    time_model = time_model or TimeModel()
    config = config or RouterConfig()
    chooser = make_router(router, dataclasses.replace(config, capacity_blocks=capacity_blocks))
    names = [f"r{i}" for i in range(num_replicas)]
    caches = {n: RadixCache(block_size=1, policy=make_policy("lru")) for n in names}
    busy: dict[str, list[float]] = {n: [] for n in names}  # heaps of finish times (s)
    decisions: Counter[str] = Counter()
    served: Counter[str] = Counter()
    hit_tokens = load_sum = max_load = 0
    for request, path in zip(requests, canonical_paths(requests), strict=True):
        now = request.timestamp / 1000.0
        for heap in busy.values():
            while heap and heap[0] <= now:
                heapq.heappop(heap)
        loads = {n: len(busy[n]) for n in names}
        key = RoutingKey("", path)
        decision = chooser.choose(key, loads)
        chooser.routed(key, decision)
        replica = decision.replica
        decisions[decision.reason] += 1
        served[replica] += 1
        load_sum += loads[replica]
        max_load = max(max_load, loads[replica] + 1)
        hits, _ = serve_blocks(caches[replica], path, capacity_blocks)
        hit = min(hits * BLOCK_TOKENS, request.input_length)
        hit_tokens += hit
        finish = now + time_model.duration_s(request.input_length - hit, request.output_length)
        heapq.heappush(busy[replica], finish)
    return RoutedResult(
        router=router,
        num_replicas=num_replicas,
        capacity_blocks=capacity_blocks,
        num_requests=len(requests),
        input_tokens=sum(r.input_length for r in requests),
        hit_tokens=hit_tokens,
        decisions=dict(decisions),
        requests_per_replica=tuple(served[n] for n in names),
        mean_load=load_sum / max(1, len(requests)),
        max_load=max_load,
    )


def routed_table(results: Sequence[RoutedResult]) -> str:
    """A Markdown table: hit rate, decisions and balance per replay."""
    from kvengine.results import markdown_table

    header = ["router", "replicas", "capacity per replica (blocks)", "token hit rate"]
    header += ["decisions", "requests per replica", "mean load at arrival"]
    rows = [
        [
            r.router,
            r.num_replicas,
            r.capacity_blocks,
            f"{r.token_hit_rate:.4f}",
            ", ".join(f"{k} {v}" for k, v in sorted(r.decisions.items())),
            "/".join(str(n) for n in r.requests_per_replica),
            f"{r.mean_load:.2f}",
        ]
        for r in results
    ]
    return markdown_table(header, rows)


def routed_rows(results: Sequence[RoutedResult], trace: str) -> list[dict]:
    """JSON rows (kvengine.results): hit rate, decisions and load of each routed replay."""
    from kvengine.results import make_row

    rows = []
    for r in results:
        config = dict(
            trace=trace, router=r.router, num_replicas=r.num_replicas, capacity_blocks=r.capacity_blocks
        )
        rows.append(make_row("simulate_routing", "token_hit_rate", r.token_hit_rate, "fraction", **config))
        rows.append(make_row("simulate_routing", "mean_load", r.mean_load, "requests", **config))
        rows += [
            make_row("simulate_routing", f"decisions_{k}", v, "requests", **config)
            for k, v in sorted(r.decisions.items())
        ]
    return rows
