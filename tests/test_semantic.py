"""The semantic cache's parts against references: thresholds vs brute force and a closed form,
faiss indexes vs brute-force search, the cache's decisions, tenants and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from kvengine.errors import InvalidRequestError
from kvengine.semantic.cache import SemanticCache, SemanticCacheConfig
from kvengine.semantic.embedder import Embedder, make_embedder
from kvengine.semantic.index import INDEXES, NO_ID, make_index
from kvengine.semantic.thresholds import (
    NEVER,
    THRESHOLD_POLICIES,
    Observations,
    certified_threshold,
    make_policy,
    wilson_upper,
)

# ---- thresholds ----


@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_upper_matches_scipy(confidence: float) -> None:
    for n in (1, 2, 7, 30, 400):
        for k in sorted({0, 1, n // 3, n}):
            # A one-sided bound at c is the upper end of the two-sided interval at 2c - 1.
            ref = binomtest(k, n).proportion_ci(confidence_level=2 * confidence - 1, method="wilson").high
            got = wilson_upper(np.array([k]), np.array([n]), confidence)[0]
            assert got == pytest.approx(ref, abs=1e-9), (n, k)


def _brute_threshold(sims: np.ndarray, correct: np.ndarray, max_error: float, confidence: float) -> float:
    """Every observed similarity tried as the threshold, counted one by one; the lowest that passes."""
    for t in sorted(set(sims.tolist())):
        above = [c for s, c in zip(sims.tolist(), correct.tolist(), strict=True) if s >= t]
        wrong = sum(not c for c in above)
        bound = binomtest(wrong, len(above)).proportion_ci(2 * confidence - 1, method="wilson").high
        if bound <= max_error:
            return t
    return NEVER


@pytest.mark.parametrize("seed", range(6))
def test_certified_threshold_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    sims = np.round(rng.uniform(0.3, 1.0, n), 2)  # rounded: many ties, which must be taken together
    correct = rng.uniform(size=n) < sims**4
    for max_error in (0.01, 0.05, 0.1, 0.3):
        got = certified_threshold(sims, correct, max_error, 0.95)
        assert got == _brute_threshold(sims, correct, max_error, 0.95)


def test_certified_threshold_edges() -> None:
    empty = np.array([], dtype=np.float64)
    assert certified_threshold(empty, empty.astype(bool), 0.1, 0.95) == NEVER
    # All correct: certified once there are enough of them (about z^2 / max_error).
    sims = np.linspace(0.5, 1.0, 100)
    assert certified_threshold(sims, np.ones(100, bool), 0.1, 0.95) == sims[0]
    assert certified_threshold(sims[:10], np.ones(10, bool), 0.1, 0.95) == NEVER
    # All wrong: never.
    assert certified_threshold(sims, np.zeros(100, bool), 0.1, 0.95) == NEVER


def _logistic_error_above(t: np.ndarray, slope: float, mid: float) -> np.ndarray:
    """Closed form: error rate among s ~ U(t, 1) when P(correct | s) = sigmoid(slope (s - mid))."""

    def softplus(x: np.ndarray) -> np.ndarray:
        return np.logaddexp(0.0, x)

    mean_correct = (softplus(slope * (1 - mid)) - softplus(slope * (t - mid))) / (slope * (1 - t))
    return 1.0 - mean_correct


@pytest.mark.parametrize("max_error", [0.01, 0.05, 0.1])
def test_learned_threshold_against_closed_form(max_error: float) -> None:
    """Synthetic similarities with a known P(correct | s): the learned threshold is safe and close."""
    slope, mid, n = 40.0, 0.75, 20_000
    grid = np.linspace(0.0, 0.999, 100_000)
    best = grid[np.argmax(_logistic_error_above(grid, slope, mid) <= max_error)]  # the true optimum
    violations, gaps = 0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        sims = rng.uniform(0.0, 1.0, n)
        correct = rng.uniform(size=n) < 1 / (1 + np.exp(-slope * (sims - mid)))
        t = certified_threshold(sims, correct, max_error, 0.95)
        assert t < NEVER
        violations += float(_logistic_error_above(np.array([t]), slope, mid)[0]) > max_error
        gaps.append(t - best)
    assert violations <= 3  # at 95% confidence, about 1 of 20 expected
    assert 0.0 <= float(np.median(gaps)) < 0.06  # conservative, but not by much


def test_policies() -> None:
    assert set(THRESHOLD_POLICIES) == {"global", "vcache"}
    tenant, entry = Observations(), Observations()
    for s in np.linspace(0.6, 1.0, 200):
        tenant.add(float(s), True)
    shared = tenant.threshold(0.05, 0.95)
    assert shared == pytest.approx(0.6)
    assert make_policy("global").threshold(entry, tenant, 0.05, 0.95) == shared
    # vcache: an entry wrong at 0.9 is raised past it; one with enough evidence of its own uses its own.
    entry.add(0.9, False)
    assert make_policy("vcache").threshold(entry, tenant, 0.05, 0.95) == pytest.approx(0.9, abs=1e-9)
    assert make_policy("vcache").threshold(entry, tenant, 0.05, 0.95) > 0.9
    own = Observations()
    for s in np.linspace(0.95, 1.0, 100):
        own.add(float(s), True)
    assert make_policy("vcache").threshold(own, Observations(), 0.05, 0.95) == pytest.approx(0.95)
    with pytest.raises(InvalidRequestError, match="known threshold policies: global, vcache"):
        make_policy("static")


# ---- indexes ----


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("name", list(INDEXES))
def test_index_against_brute_force(name: str) -> None:
    rng = np.random.default_rng(1)
    dim, index = 24, make_index(name, 24)
    vectors, queries = _unit(rng, 600, dim), _unit(rng, 200, dim)
    ids, got_sims = index.search(queries)
    assert (ids == NO_ID).all() and np.isneginf(got_sims).all()
    index.add(np.arange(400), vectors[:400])
    index.remove(np.arange(0, 400, 2))  # half removed: HNSW skips them, then rebuilds
    index.add(np.arange(400, 600), vectors[400:])
    index.remove(np.array([401, 9999]))  # an absent id is a no-op
    live = np.array([i for i in range(600) if not (i < 400 and i % 2 == 0) and i != 401])
    assert len(index) == live.size
    ids, got_sims = index.search(queries)
    true = queries @ vectors[live].T
    best = live[true.argmax(axis=1)]
    assert set(ids.tolist()) <= set(live.tolist())
    np.testing.assert_allclose(got_sims, np.sum(queries * vectors[ids], axis=1), atol=1e-5)
    agree = float(np.mean(ids == best))
    assert agree == 1.0 if name != "faiss-hnsw" else agree >= 0.95


@pytest.mark.parametrize("name", list(INDEXES))
def test_index_bad_input(name: str) -> None:
    index = make_index(name, 4)
    index.add(np.array([1]), np.ones((1, 4)) / 2)
    with pytest.raises(ValueError, match="new and unique"):
        index.add(np.array([1]), np.ones((1, 4)) / 2)
    with pytest.raises(ValueError, match="ids for"):
        index.add(np.array([2, 3]), np.ones((1, 4)) / 2)
    with pytest.raises(ValueError, match="finite"):
        index.add(np.array([2]), np.full((1, 4), np.nan))
    assert len(index) == 1
    with pytest.raises(InvalidRequestError, match="known vector indexes: exact, faiss-flat, faiss-hnsw"):
        make_index("annoy", 4)


# ---- the cache ----


class TableEmbedder(Embedder):
    """Fixed vectors by text: the tests choose every similarity."""

    def __init__(self, table: dict[str, np.ndarray]) -> None:
        self.table = {k: v / np.linalg.norm(v) for k, v in table.items()}
        self.dim = len(next(iter(table.values())))

    @classmethod
    def create(cls, model: object) -> Embedder:
        raise NotImplementedError

    def embed(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.table[t] for t in texts]).astype(np.float32)


def _cache(**config: object) -> SemanticCache:
    return SemanticCache(make_embedder("hashed-ngrams"), SemanticCacheConfig(index="exact", **config))


def test_exact_repeat_hits_and_tenants_are_isolated() -> None:
    cache = _cache()
    first = cache.lookup("What is the capital of France?", tenant="a")
    assert first.decision == "miss" and first.neighbour == NO_ID
    cache.record(first, "Paris")
    again = cache.lookup("What is the capital of France?", tenant="a")
    assert again.hit and again.answer == "Paris"
    other = cache.lookup("What is the capital of France?", tenant="b")
    assert other.decision == "miss" and other.neighbour == NO_ID  # b sees nothing of a's
    with pytest.raises(ValueError, match="nothing to record"):
        cache.record(again, "Paris")
    assert cache.num_entries("a") == 1 and cache.num_entries("b") == 0
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.exact_hits) == (3, 1, 1)


def test_cache_learns_a_threshold_and_respects_it() -> None:
    """Paraphrases at similarity 0.95 are right, near misses at 0.8 wrong: after enough verified
    misses, 0.95 hits and 0.8 never does, at any bound."""
    rng = np.random.default_rng(0)
    base = {f"q{i}": rng.standard_normal(16) for i in range(400)}
    table = {}
    for name, v in base.items():
        noise = rng.standard_normal(16)
        noise -= noise @ v / (v @ v) * v
        noise *= np.linalg.norm(v) / np.linalg.norm(noise)
        table[name] = v
        table[name + "-para"] = 0.95 * v + math.sqrt(1 - 0.95**2) * noise
        table[name + "-near"] = 0.8 * v + 0.6 * noise
    cache = SemanticCache(
        TableEmbedder(table), SemanticCacheConfig(index="exact", policy="global", explore_rate=0)
    )
    hits = wrong = 0
    for i in range(400):
        for suffix, answer in (("", f"a{i}"), ("-para", f"a{i}"), ("-near", f"b{i}")):
            found = cache.lookup(f"q{i}{suffix}", max_error=0.05)
            if found.hit:
                hits += 1
                wrong += found.answer != answer
            else:
                cache.record(found, answer)
    assert wrong == 0 and hits > 100
    assert cache.stats.wrong_observations > 0


def test_bad_input_is_refused_and_nothing_is_cached() -> None:
    cache = _cache()
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan"), "0.1", True):
        with pytest.raises(InvalidRequestError, match="max_error must be a number in \\(0, 1\\)"):
            cache.lookup("hello", max_error=bad)  # type: ignore[arg-type]
    for empty in ("", "   "):
        with pytest.raises(InvalidRequestError, match="non-empty prompt"):
            cache.lookup(empty)
    assert cache.stats.lookups == 0 and cache.num_entries() == 0
    with pytest.raises(InvalidRequestError, match="confidence must be a number in \\(0, 1\\)"):
        SemanticCacheConfig(confidence=1.0)
    with pytest.raises(InvalidRequestError, match="explore_rate"):
        SemanticCacheConfig(explore_rate=2.0)
    with pytest.raises(InvalidRequestError, match="known vector indexes"):
        SemanticCacheConfig(index="nope")
    with pytest.raises(InvalidRequestError, match="known embedders: hashed-ngrams"):
        make_embedder("word2vec")
    with pytest.raises(InvalidRequestError, match="needs the served model"):
        make_embedder("model-hidden")


def test_eviction_keeps_index_and_entries_in_step() -> None:
    cache = _cache(max_entries=2)
    for text in ("one fish", "two fish", "red fish"):
        cache.record(cache.lookup(text), text.upper())
    assert cache.num_entries() == 2 and cache.stats.evictions == 1
    assert not cache.lookup("one fish").hit  # evicted: its exact repeat is a miss again
    assert cache.lookup("red fish").answer == "RED FISH"
