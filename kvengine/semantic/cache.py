"""The semantic response cache: answers reused for prompts close in meaning, under a maximum error rate.

`SemanticCache.lookup(prompt, tenant, max_error)` embeds the prompt, finds
its nearest cached prompt in the tenant's own index and decides:

- `hit`: the similarity reaches the threshold the policy certifies for that
  entry at `max_error` (thresholds.py), or the prompt is the cached one
  word for word; the cached answer is returned;
- `explore`: it would be a hit, but with probability `explore_rate` the
  real answer is computed anyway, to check the threshold (vCache's
  exploration); the caller then calls `record`;
- `miss`: nothing near enough; the caller computes the answer and calls
  `record`.

`record(lookup, answer)` compares the computed answer with the neighbour's
(`judge`, exact text by default) and keeps that observation for the
neighbour and for the tenant, then caches the prompt and its answer as a new
entry. Every miss near a cached prompt is thus a free verification; only
explorations cost a computation a hit would have saved.

Tenants never share anything: each has its own index, entries and
observations, so one tenant's prompts never make another's hit (nor come
back faster). Entries past `max_entries` per tenant are evicted least
recently used. Lookups and records are serialized by a lock.

What an answer is, and whether sampling allows reuse, is the caller's
business (the server's: kvengine/server/semantic_cache.py).
"""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from kvengine.errors import InvalidRequestError
from kvengine.semantic.embedder import Embedder
from kvengine.semantic.index import INDEXES, NO_ID, VectorIndex, make_index
from kvengine.semantic.thresholds import (
    NEVER,
    THRESHOLD_POLICIES,
    Observations,
    check_bound,
    make_policy,
)

Decision = Literal["hit", "explore", "miss"]


def same_text(a: str, b: str) -> bool:
    """The default judge: the two answers are the same text up to surrounding and repeated whitespace."""
    return a.split() == b.split()


@dataclass(frozen=True)
class SemanticCacheConfig:
    """How the cache embeds, searches and learns; checked when built."""

    embedder: str = "model-hidden"
    index: str = "faiss-flat"
    policy: str = "vcache"
    confidence: float = 0.95  # of the upper bound each threshold is certified with
    explore_rate: float = 0.1  # chance that a would-be hit is computed anyway and checked
    max_entries: int = 10_000  # per tenant; least recently used evicted past it
    seed: int = 0  # of the exploration coin

    def __post_init__(self) -> None:
        check_bound(0.5, self.confidence)
        if not 0.0 <= self.explore_rate <= 1.0:
            raise InvalidRequestError(f"explore_rate must be in [0, 1], got {self.explore_rate}")
        if self.max_entries < 1:
            raise InvalidRequestError(f"max_entries must be at least 1, got {self.max_entries}")
        INDEXES.lookup(self.index)
        THRESHOLD_POLICIES.lookup(self.policy)


@dataclass
class Entry:
    id: int
    prompt: str
    answer: str
    observations: Observations = field(default_factory=lambda: Observations(capacity=1_000))


@dataclass(frozen=True)
class Lookup:
    """What `lookup` found and decided; hand it back to `record` after computing the answer."""

    tenant: str
    prompt: str
    vector: np.ndarray  # (dim,)
    decision: Decision
    neighbour: int  # entry id, or NO_ID when the tenant has no entry
    similarity: float
    threshold: float  # the neighbour's at this max_error (NEVER: none certified yet)
    answer: str | None  # the cached answer, on a hit

    @property
    def hit(self) -> bool:
        return self.decision == "hit"


class _Tenant:
    def __init__(self, index: VectorIndex, num_pooled: int) -> None:
        self.index = index
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.observations = Observations(capacity=num_pooled)


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0  # answered from the cache (exact prompt or certified similarity)
    exact_hits: int = 0  # of which, the same prompt text
    explorations: int = 0
    misses: int = 0
    observations: int = 0  # verified (similarity, correct) pairs
    wrong_observations: int = 0  # of which, the neighbour's answer was wrong
    evictions: int = 0


class SemanticCache:
    """Per-tenant semantic cache over one embedder (see the module docstring)."""

    def __init__(
        self,
        embedder: Embedder,
        config: SemanticCacheConfig | None = None,
        judge: Callable[[str, str], bool] = same_text,
    ) -> None:
        self.config = config or SemanticCacheConfig()
        self.embedder = embedder
        self.judge = judge
        self.policy = make_policy(self.config.policy)
        make_index(self.config.index, 1)  # fails now, not at the first request, without faiss
        self.stats = CacheStats()
        self._tenants: dict[str, _Tenant] = {}
        self._next_id = 0
        self._coin = random.Random(self.config.seed)
        self._lock = threading.Lock()

    def embed(self, prompt: str) -> np.ndarray:
        """The prompt's unit vector; InvalidRequestError for a prompt with nothing to embed."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InvalidRequestError("the semantic cache needs a non-empty prompt text", param="prompt")
        return self.embedder.embed([prompt])[0]

    def lookup(
        self, prompt: str, tenant: str = "", max_error: float = 0.05, vector: np.ndarray | None = None
    ) -> Lookup:
        """Decide hit / explore / miss for `prompt` (see the module docstring); `vector` skips embedding."""
        check_bound(max_error, self.config.confidence)
        vec = self.embed(prompt) if vector is None else vector
        with self._lock:
            self.stats.lookups += 1
            t = self._tenants.get(tenant)
            if t is None or not t.entries:
                self.stats.misses += 1
                return Lookup(tenant, prompt, vec, "miss", NO_ID, -np.inf, NEVER, None)
            ids, sims = t.index.search(vec[None])
            entry = t.entries[int(ids[0])]
            sim = float(sims[0])
            if entry.prompt == prompt:
                threshold = -np.inf
            else:
                threshold = self.policy.threshold(
                    entry.observations, t.observations, max_error, self.config.confidence
                )
            decision: Decision = "miss"
            if sim >= threshold:
                explore = threshold > -np.inf and self._coin.random() < self.config.explore_rate
                decision = "explore" if explore else "hit"
            self._count(decision, threshold)
            if decision == "hit":
                t.entries.move_to_end(entry.id)
            answer = entry.answer if decision == "hit" else None
            return Lookup(tenant, prompt, vec, decision, entry.id, sim, threshold, answer)

    def _count(self, decision: Decision, threshold: float) -> None:
        if decision == "hit":
            self.stats.hits += 1
            self.stats.exact_hits += threshold == -np.inf
        elif decision == "explore":
            self.stats.explorations += 1
        else:
            self.stats.misses += 1

    def record(self, lookup: Lookup, answer: str) -> None:
        """After computing `answer` for a miss or an exploration: learn from it and cache it.

        A hit needs no record (ValueError). A neighbour evicted meanwhile
        teaches nothing (its answer is gone).
        """
        if lookup.hit:
            raise ValueError("a hit was answered from the cache; there is nothing to record")
        with self._lock:
            t = self._tenants.get(lookup.tenant)
            if t is None:
                t = self._tenants[lookup.tenant] = _Tenant(
                    make_index(self.config.index, int(lookup.vector.shape[0])), num_pooled=100_000
                )
            neighbour = t.entries.get(lookup.neighbour)
            if neighbour is not None and neighbour.prompt != lookup.prompt:
                self._observe(t, neighbour, lookup.similarity, answer)
            if neighbour is not None and neighbour.prompt == lookup.prompt:
                neighbour.answer = answer  # the same prompt again: its newest answer replaces the old
                t.entries.move_to_end(neighbour.id)
                return
            self._insert(t, lookup, answer)

    def _observe(self, t: _Tenant, neighbour: Entry, similarity: float, answer: str) -> None:
        correct = self.judge(neighbour.answer, answer)
        t.observations.add(similarity, correct)
        neighbour.observations.add(similarity, correct)
        self.stats.observations += 1
        self.stats.wrong_observations += not correct

    def _insert(self, t: _Tenant, lookup: Lookup, answer: str) -> None:
        entry = Entry(self._next_id, lookup.prompt, answer)
        self._next_id += 1
        t.index.add(np.array([entry.id]), lookup.vector[None])
        t.entries[entry.id] = entry
        while len(t.entries) > self.config.max_entries:
            old, _ = t.entries.popitem(last=False)
            t.index.remove(np.array([old]))
            self.stats.evictions += 1

    def total_entries(self) -> int:
        return sum(len(t.entries) for t in self._tenants.values())

    def num_entries(self, tenant: str = "") -> int:
        t = self._tenants.get(tenant)
        return len(t.entries) if t else 0
