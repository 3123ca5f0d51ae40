"""Eviction policies: the registry, each policy's documented order, and Belady as a bound."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache.policy import POLICIES, Belady, make_policy, online_policy_names
from kvengine.cache.radix import RadixCache
from kvengine.errors import InvalidRequestError
from kvengine.sim.replay import replay
from kvengine.sim.trace import BLOCK_TOKENS, TraceRequest


def test_unknown_policy_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError, match="unknown eviction policy 'mru'; known policies: lru, lfu"):
        make_policy("mru")
    with pytest.raises(InvalidRequestError, match="needs the future"):
        make_policy("belady")
    with pytest.raises(InvalidRequestError, match="slack must be > 0"):
        make_policy("predictive", slack=0)
    with pytest.raises(InvalidRequestError, match="bad arguments for eviction policy 'lru'"):
        make_policy("lru", alpha=1)
    assert set(online_policy_names()) == set(POLICIES) - {"belady"}


def _tree(policy: str, **kwargs: object) -> RadixCache:
    return RadixCache(block_size=1, policy=make_policy(policy, **kwargs))


def _run(tree: RadixCache, script: list[str]) -> None:
    """Insert one single-block sequence per letter ('A' -> [65]), in order."""
    for letter in script:
        tree.insert([ord(letter)], [letter])


def _eviction_order(tree: RadixCache) -> list[str]:
    return [tree.evict(1)[0] for _ in range(tree.num_cached_blocks)]


def test_lru_evicts_least_recently_used_first() -> None:
    tree = _tree("lru")
    _run(tree, ["A", "B", "C", "A", "B"])
    assert _eviction_order(tree) == ["C", "A", "B"]


def test_lfu_evicts_fewest_accesses_first_lru_among_equals() -> None:
    tree = _tree("lfu")
    _run(tree, ["A", "B", "C", "D", "C", "C", "A", "B"])  # A 2, B 2, C 3, D 1
    assert _eviction_order(tree) == ["D", "A", "B", "C"]


def test_gdsf_ages_out_entries_popular_long_ago() -> None:
    tree = _tree("gdsf")
    _run(tree, ["A", "A", "A", "B"])  # H(A) = 0 + 3, H(B) = 0 + 1
    assert tree.evict(1) == ["B"]  # L = 1
    _run(tree, ["C", "D"])  # H = 1 + 1 = 2 each
    assert tree.evict(1) == ["C"]  # L = 2
    _run(tree, ["E"])  # H(E) = 2 + 1 = 3 ties with A; A is the older node
    assert tree.evict(1) == ["D"]  # H(D) = 2 < 3
    assert tree.evict(1) == ["A"]  # plain LFU would keep A (3 accesses) and evict E
    assert tree.evict(1) == ["E"]


def test_predictive_evicts_predicted_dead_first_lru_among_equals() -> None:
    tree = _tree("predictive", slack=4.0)
    _run(tree, ["A", "A", "B", "C"])  # A: gap 1, last access at 2; B, C never reused
    # now = 4: A's age 2 <= 4 * 1, predicted reused; B and C predicted dead, LRU among them.
    assert _eviction_order(tree) == ["B", "C", "A"]  # LRU would evict A first
    tree = _tree("predictive", slack=4.0)
    _run(tree, ["A", "A", "B", "C", "D", "E", "F"])  # now = 7: A overdue (age 5 > 4), predicted dead
    assert _eviction_order(tree) == ["A", "B", "C", "D", "E", "F"]


def test_predictive_remembers_evicted_prefixes() -> None:
    for max_ghosts, expected in [(1 << 16, ["B", "C", "D", "A"]), (0, ["B", "C", "A", "D"])]:
        tree = _tree("predictive", slack=4.0, max_ghosts=max_ghosts)
        _run(tree, ["A", "B"])
        assert tree.evict(1) == ["A"]
        # A comes back at 4: its ghost (last access 1) gives it a gap of 3, so it is
        # predicted reused at 5; without ghosts it is a new node, dead, and LRU decides.
        _run(tree, ["C", "A", "D"])
        assert _eviction_order(tree) == expected


def test_belady_evicts_farthest_next_use_block_by_block() -> None:
    # Requests as block paths; blocks 1 -> 2 -> 3 are one chain, 4 another.
    future = [[1, 2, 3], [4], [1], [4], [1, 2]]
    tree = RadixCache(block_size=1, policy=Belady(future=future))
    policy = tree.policy
    assert isinstance(policy, Belady)
    for i, path in enumerate(future[:2]):
        policy.advance(i)
        tree.insert(path, path)
    policy.advance(1)
    # Next uses after request 1: block 1 at 2, block 2 at 4, block 3 never, block 4 at 3.
    assert tree.evict(1) == [3]
    assert tree.evict(1) == [2]  # the same leaf again: its new last block is now the farthest
    assert tree.evict(1) == [4]
    assert tree.evict(1) == [1]


def _request(path: list[int]) -> TraceRequest:
    return TraceRequest(0, len(path) * BLOCK_TOKENS, 1, tuple(path))


paths_st = st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=30)


@settings(max_examples=150, deadline=None)
@given(paths=paths_st, capacity=st.integers(1, 10))
def test_belady_is_never_beaten(paths: list[list[int]], capacity: int) -> None:
    requests = [_request(p) for p in paths]
    bound = replay(requests, capacity, "belady")
    for name in online_policy_names():
        result = replay(requests, capacity, name)
        assert result.hit_blocks <= bound.hit_blocks, name
