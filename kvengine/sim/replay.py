"""Trace replay: prefix-cache hit rates of each eviction policy, without a model.

Requests are served one at a time in timestamp order. Each request looks up
its prompt blocks (one hash id = one block) in a `RadixCache` of
`capacity_blocks` blocks, locks what matched, evicts what it must to make
room, inserts its blocks and unlocks: the order the engine will follow. A
prompt longer than the cache caches only its first `capacity_blocks` blocks.
Hits are counted in blocks and in tokens (a prompt's last block may be
partial). The same replay with Belady's policy, which reads the future from
the trace, bounds what any eviction policy could reach.

`kvengine simulate` (kvengine/cli/simulate.py) is the command-line face of this module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from kvengine.cache.policy import Belady, EvictionPolicy, make_policy
from kvengine.cache.radix import RadixCache
from kvengine.errors import InvalidRequestError
from kvengine.sim.trace import BLOCK_TOKENS, TraceRequest

_T = TypeVar("_T")


@dataclass(frozen=True)
class SimResult:
    """Hits of one replay (one policy, one capacity)."""

    policy: str
    capacity_blocks: int
    num_requests: int
    input_tokens: int
    hit_tokens: int
    input_blocks: int
    hit_blocks: int
    evicted_blocks: int

    @property
    def token_hit_rate(self) -> float:
        return self.hit_tokens / max(1, self.input_tokens)

    @property
    def block_hit_rate(self) -> float:
        return self.hit_blocks / max(1, self.input_blocks)


def serving_order(requests: Sequence[TraceRequest]) -> list[TraceRequest]:
    """Requests by timestamp; equal timestamps keep file order."""
    return sorted(requests, key=lambda r: r.timestamp)


def canonical_paths(requests: Sequence[TraceRequest]) -> list[tuple[int, ...]]:
    """Block ids that name a block together with its whole prefix.

    Mooncake's hash ids already do; renumbering makes it true of any trace, and
    is what lets Belady name a block by its id alone.
    """
    ids: dict[tuple[int, int], int] = {}
    paths = []
    for request in requests:
        parent, path = -1, []
        for h in request.hash_ids:
            parent = ids.setdefault((parent, h), len(ids))
            path.append(parent)
        paths.append(tuple(path))
    return paths


def replay(
    requests: Sequence[TraceRequest], capacity_blocks: int, policy: str, progress: bool = False
) -> SimResult:
    """Serve `requests` (already in serving order) through a cache of `capacity_blocks` blocks."""
    if capacity_blocks < 1:
        raise InvalidRequestError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
    paths = [p[:capacity_blocks] for p in canonical_paths(requests)]
    evictor: EvictionPolicy = Belady(future=paths) if policy == "belady" else make_policy(policy)
    tree = RadixCache(block_size=1, policy=evictor)
    hit_tokens = hit_blocks = evicted = 0
    for i, (request, path) in enumerate(_progress(list(zip(requests, paths, strict=True)), progress)):
        if isinstance(evictor, Belady):
            evictor.advance(i)
        hits, dropped = serve_blocks(tree, path, capacity_blocks)
        hit_blocks += hits
        hit_tokens += min(hits * BLOCK_TOKENS, request.input_length)
        evicted += dropped
    return SimResult(
        policy=policy,
        capacity_blocks=capacity_blocks,
        num_requests=len(requests),
        input_tokens=sum(r.input_length for r in requests),
        hit_tokens=hit_tokens,
        input_blocks=sum(len(r.hash_ids) for r in requests),
        hit_blocks=hit_blocks,
        evicted_blocks=evicted,
    )


def serve_blocks(tree: RadixCache, path: tuple[int, ...], capacity_blocks: int) -> tuple[int, int]:
    """One request through a cache of `capacity_blocks`: (blocks hit, blocks evicted).

    Looks `path` up, locks what matched, evicts what it must, inserts the
    path (at most `capacity_blocks` long) and unlocks: the engine's order.
    """
    path = path[:capacity_blocks]
    match = tree.match_prefix(path)
    tree.lock(match.last_node)
    evicted = 0
    need = len(path) - match.num_tokens - (capacity_blocks - tree.num_cached_blocks)
    if need > 0:
        evicted = len(tree.evict(need))
    tree.insert(path, path)  # the block ids themselves serve as values
    tree.unlock(match.last_node)
    return match.num_tokens, evicted


def _progress(items: list[_T], enabled: bool) -> Iterable[_T]:
    """A progress bar on stderr for long traces (tqdm hides it when stderr is not a terminal)."""
    if not enabled or len(items) < 1000:
        return items
    from tqdm import tqdm

    return tqdm(items, unit="req", leave=False, mininterval=0.5, disable=None)


def unbounded_hits(requests: Sequence[TraceRequest]) -> SimResult:
    """Hits of a cache that never evicts (requests in serving order): the ceiling of all replays."""
    seen: set[int] = set()
    hit_tokens = hit_blocks = 0
    for request, path in zip(requests, canonical_paths(requests), strict=True):
        hits = sum(1 for b in path if b in seen)  # prefix-closed: the hits are a prefix
        hit_blocks += hits
        hit_tokens += min(hits * BLOCK_TOKENS, request.input_length)
        seen.update(path)
    return SimResult(
        policy="unbounded",
        capacity_blocks=len(seen),
        num_requests=len(requests),
        input_tokens=sum(r.input_length for r in requests),
        hit_tokens=hit_tokens,
        input_blocks=sum(len(r.hash_ids) for r in requests),
        hit_blocks=hit_blocks,
        evicted_blocks=0,
    )


def run_simulation(
    requests: Sequence[TraceRequest],
    capacities: Sequence[int],
    policies: Sequence[str],
    progress: bool = False,
) -> list[SimResult]:
    """One replay per (capacity, policy), in that order; requests are put in serving order first."""
    ordered = serving_order(requests)
    return [replay(ordered, c, p, progress) for c in capacities for p in policies]


def results_table(results: Sequence[SimResult]) -> str:
    """A Markdown table of hit rates, one row per replay."""
    from kvengine.results import markdown_table

    header = ["policy", "capacity (blocks)", "token hit rate", "block hit rate", "evicted blocks"]
    rows = [
        [r.policy, r.capacity_blocks, f"{r.token_hit_rate:.4f}", f"{r.block_hit_rate:.4f}", r.evicted_blocks]
        for r in results
    ]
    return markdown_table(header, rows)


def result_rows(results: Sequence[SimResult], trace: str) -> list[dict]:
    """JSON rows (kvengine.results) for each replay's token and block hit rates and evictions."""
    from kvengine.results import make_row

    rows = []
    for r in results:
        config = dict(
            trace=trace, policy=r.policy, capacity_blocks=r.capacity_blocks, num_requests=r.num_requests
        )
        rows += [
            make_row("simulate", "token_hit_rate", r.token_hit_rate, "fraction", **config),
            make_row("simulate", "block_hit_rate", r.block_hit_rate, "fraction", **config),
            make_row("simulate", "evicted_blocks", r.evicted_blocks, "blocks", **config),
        ]
    return rows
