"""Radix prefix cache: hand-made cases, and random operations against a brute-force model."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache.policy import POLICIES, make_policy, online_policy_names
from kvengine.cache.radix import RadixCache, RadixNode


def test_blocks_are_whole_and_partial_blocks_are_never_cached() -> None:
    tree = RadixCache(block_size=4)
    assert tree.insert([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], ["a", "b"]) == 8  # tokens 9, 10 dropped
    assert tree.num_cached_blocks == 2
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 99, 9])
    assert (m.num_tokens, m.values) == (4, ["a"])
    m = tree.match_prefix([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert (m.num_tokens, m.values) == (8, ["a", "b"])
    assert tree.match_prefix([1, 2, 3]).num_tokens == 0
    with pytest.raises(ValueError, match="2 whole blocks of tokens but 3 values"):
        tree.insert(list(range(8)), ["x", "y", "z"])
    tree.check_invariants()


def test_insert_returns_new_tokens_and_keeps_first_values() -> None:
    tree = RadixCache(block_size=2)
    assert tree.insert([1, 2, 3, 4], ["a", "b"]) == 4
    # Shares the first block: that value stays the caller's, the tree takes the last two.
    assert tree.insert([1, 2, 5, 6, 7, 8], ["dup", "c", "d"]) == 4
    assert tree.insert([1, 2, 3, 4], ["x", "y"]) == 0
    assert tree.match_prefix([1, 2, 5, 6, 7, 8]).values == ["a", "c", "d"]
    assert tree.match_prefix([1, 2, 3, 4]).values == ["a", "b"]
    assert tree.num_cached_blocks == 4
    tree.check_invariants()


def test_children_are_keyed_by_their_first_block() -> None:
    tree = RadixCache(block_size=2)
    tree.insert([1, 2, 3, 4], ["a", "b"])
    tree.insert([1, 9, 3, 4], ["c", "d"])  # same first token, different first block
    root = tree.root()
    assert sorted(root.children) == [(1, 2), (1, 9)]
    assert tree.match_prefix([1, 9, 3, 4]).values == ["c", "d"]
    tree.check_invariants()


def test_namespaces_never_share() -> None:
    tree = RadixCache(block_size=2)
    tree.insert([1, 2, 3, 4], ["a", "b"], namespace=("model", "tenant-a"))
    assert tree.match_prefix([1, 2, 3, 4], namespace=("model", "tenant-b")).num_tokens == 0
    assert tree.match_prefix([1, 2, 3, 4]).num_tokens == 0
    assert tree.insert([1, 2, 3, 4], ["c", "d"], namespace=("model", "tenant-b")) == 4
    assert tree.match_prefix([1, 2], namespace=("model", "tenant-a")).values == ["a"]
    assert tree.num_cached_blocks == 4
    tree.check_invariants()


def test_locked_path_is_never_evicted() -> None:
    tree = RadixCache(block_size=1)
    tree.insert([1, 2, 3], ["a", "b", "c"])
    tree.insert([1, 2, 4, 5], ["a", "b", "d", "e"])
    m = tree.match_prefix([1, 2, 3, 7])
    assert m.values == ["a", "b", "c"]
    tree.lock(m.last_node)
    assert (tree.num_locked_blocks, tree.num_evictable_blocks) == (3, 2)
    assert sorted(tree.evict(10)) == ["d", "e"]  # only the other branch could go
    assert tree.match_prefix([1, 2, 3]).values == ["a", "b", "c"]
    tree.check_invariants()
    tree.unlock(m.last_node)
    assert tree.evict(10) == ["c", "b", "a"]  # leaves first: deepest block first
    with pytest.raises(ValueError, match="not locked"):
        tree.unlock(m.last_node)
    assert tree.num_cached_blocks == 0
    tree.check_invariants()


def test_lock_survives_a_split_of_the_locked_node() -> None:
    tree = RadixCache(block_size=1)
    tree.insert([1, 2, 3, 4], ["a", "b", "c", "d"])
    m = tree.match_prefix([1, 2, 3, 4])
    tree.lock(m.last_node)
    tree.insert([1, 2, 9], ["a", "b", "x"])  # splits the locked edge after two blocks
    tree.check_invariants()
    assert tree.evict(10) == ["x"]
    tree.unlock(m.last_node)  # the lower half still unlocks the upper half
    assert tree.num_locked_blocks == 0
    assert tree.evict(10) == ["d", "c", "b", "a"]
    tree.check_invariants()


def test_a_match_ending_inside_an_edge_locks_only_the_matched_blocks() -> None:
    tree = RadixCache(block_size=1)
    tree.insert([1, 2, 3, 4], ["a", "b", "c", "d"])
    m = tree.match_prefix([1, 2, 9])
    assert (m.num_tokens, m.values, m.last_node.key) == (2, ["a", "b"], (1, 2))
    tree.lock(m.last_node)
    assert tree.num_locked_blocks == 2
    assert tree.evict(10) == ["d", "c"]
    tree.check_invariants()


# ---- random operations against a brute-force model -------------------------------------------

BS = 2
tokens_st = st.lists(st.integers(0, 2), max_size=9)
op_st = st.one_of(
    st.tuples(st.just("insert"), st.integers(0, 1), tokens_st),
    st.tuples(st.just("match"), st.integers(0, 1), tokens_st),
    st.tuples(st.just("lock"), st.integers(0, 1), tokens_st),
    st.tuples(st.just("unlock"), st.integers(0, 7), st.just([])),
    st.tuples(st.just("evict"), st.integers(0, 6), st.just([])),
)


class Model:
    """Everything inserted and not evicted, as a dict of block prefixes -> value."""

    def __init__(self) -> None:
        self.cached: dict[tuple[Any, tuple[int, ...]], str] = {}
        self.key_of: dict[str, tuple[Any, tuple[int, ...]]] = {}

    def longest_prefix(self, ns: int, tokens: list[int]) -> list[str]:
        values = []
        for j in range(1, len(tokens) // BS + 1):
            key = (ns, tuple(tokens[: j * BS]))
            if key not in self.cached:
                break
            values.append(self.cached[key])
        return values

    def insert(self, ns: int, tokens: list[int], values: list[str]) -> int:
        present = len(self.longest_prefix(ns, tokens))
        for j in range(present, len(values)):
            key = (ns, tuple(tokens[: (j + 1) * BS]))
            self.cached[key], self.key_of[values[j]] = values[j], key
        return (len(values) - present) * BS

    def is_prefix_closed(self) -> bool:
        return all(len(t) == BS or (ns, t[:-BS]) in self.cached for ns, t in self.cached)


def _apply(tree: RadixCache, model: Model, locks: list[tuple[RadixNode, set]], op: tuple, step: int) -> None:
    kind, arg, tokens = op
    if kind == "insert":
        values = [f"v{step}.{j}" for j in range(len(tokens) // BS)]
        assert tree.insert(tokens, values, namespace=arg) == model.insert(arg, tokens, values)
    elif kind in ("match", "lock"):
        m = tree.match_prefix(tokens, namespace=arg)
        expected = model.longest_prefix(arg, tokens)
        assert (m.num_tokens, m.values) == (len(expected) * BS, expected)
        if kind == "lock":
            tree.lock(m.last_node)
            locks.append((m.last_node, {model.key_of[v] for v in expected}))
    elif kind == "unlock" and locks:
        tree.unlock(locks.pop(arg % len(locks))[0])
    elif kind == "evict":
        evictable = tree.num_evictable_blocks
        evicted = tree.evict(arg)
        assert len(evicted) == min(arg, evictable)
        protected = set().union(*(keys for _, keys in locks))
        for value in evicted:
            key = model.key_of.pop(value)
            assert key not in protected, "a locked block was evicted"
            del model.cached[key]
        assert model.is_prefix_closed(), "an inner block was evicted before its leaves"


@pytest.mark.parametrize("policy", online_policy_names())
@settings(max_examples=120, deadline=None)
@given(ops=st.lists(op_st, max_size=40))
def test_random_operations_match_brute_force(policy: str, ops: list[tuple]) -> None:
    tree, model = RadixCache(block_size=BS, policy=policy), Model()
    locks: list[tuple[RadixNode, set]] = []
    for step, op in enumerate(ops):
        _apply(tree, model, locks, op, step)
        tree.check_invariants()
        assert tree.num_cached_blocks == len(model.cached)
    for node, _ in locks:
        tree.unlock(node)
    assert tree.num_locked_blocks == 0
    assert len(tree.evict(1000)) == len(model.cached)
    tree.check_invariants()


# ---- eviction order against choosing every block afresh ----------------------------------------


def _policy_tree(policy: str, ops: list[tuple]) -> RadixCache:
    """A tree built by `ops` (inserts and locks only) under `policy`; Belady sees the inserts as its future."""
    future = [tokens for kind, _, tokens in ops if kind == "insert"]
    kwargs = {"future": future} if POLICIES.lookup(policy).clairvoyant else {}
    tree = RadixCache(block_size=BS, policy=make_policy(policy, **kwargs))
    for step, (kind, ns, tokens) in enumerate(ops):
        if kind == "insert":
            tree.insert(tokens, [f"v{step}.{j}" for j in range(len(tokens) // BS)], namespace=ns)
        elif kind == "lock":
            tree.lock(tree.match_prefix(tokens, namespace=ns).last_node)
    return tree


def _evict_one_by_one(tree: RadixCache, n: int) -> list[str]:
    """The order of sorting every candidate again before each block: the smallest priority goes."""
    out: list[str] = []
    while len(out) < n:
        candidates = [x for x in tree.nodes() if not x.children and x.lock_ref == 0]
        if not candidates:
            break
        victim = min(candidates, key=lambda x: tree.policy.priority(x, x.num_blocks - 1))
        out.append(victim.values[-1])
        assert tree.evict(1) == out[-1:]
    return out


# Few distinct tokens and long prompts: paths share prefixes, so evicting leaves empties parents.
insert_st = st.tuples(st.just("insert"), st.integers(0, 1), st.lists(st.integers(0, 1), max_size=12))
build_st = st.lists(
    st.one_of(insert_st, insert_st, st.tuples(st.just("lock"), st.integers(0, 1), tokens_st)), max_size=30
)


@pytest.mark.parametrize("policy", list(POLICIES))
@settings(max_examples=80, deadline=None)
@given(ops=build_st, sizes=st.lists(st.integers(1, 12), min_size=1, max_size=4))
def test_one_evict_call_matches_choosing_every_block_afresh(
    policy: str, ops: list[tuple], sizes: list[int]
) -> None:
    """One call's heap, built once, evicts what re-sorting all candidates for every block would."""
    fast, slow = _policy_tree(policy, ops), _policy_tree(policy, ops)
    for n in sizes:
        assert fast.evict(n) == _evict_one_by_one(slow, n)
        fast.check_invariants()
    assert fast.num_cached_blocks == slow.num_cached_blocks
