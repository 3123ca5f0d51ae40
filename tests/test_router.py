"""The cluster's routing core (no Ray): prefix trees against brute force, routers' decisions, keys."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cluster.keys import prompt_blocks, routing_key, text_blocks
from kvengine.cluster.prefix_tree import PrefixTree, RoutingKey
from kvengine.cluster.routing import (
    LEAST_LOAD,
    LOAD_FALLBACK,
    NO_MATCH,
    PREFIX_HIT,
    ROUND_ROBIN,
    ROUTERS,
    Decision,
    PrefixRouter,
    RouterConfig,
    make_router,
    overloaded,
)
from kvengine.errors import InvalidRequestError

TENANTS = st.sampled_from(["", "a", "b"])
KEYS = st.builds(RoutingKey, TENANTS, st.lists(st.integers(0, 3), max_size=6).map(tuple))


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _brute_match(held: list[RoutingKey], key: RoutingKey) -> int:
    """Longest prefix of `key` among held keys of the same tenant, by scanning them all."""
    return max((_common(k.blocks, key.blocks) for k in held if k.tenant == key.tenant), default=0)


@settings(max_examples=300, deadline=None)
@given(st.lists(KEYS, max_size=25), st.lists(KEYS, min_size=1, max_size=10))
def test_unbounded_tree_matches_brute_force(inserted: list[RoutingKey], queries: list[RoutingKey]) -> None:
    tree = PrefixTree()
    for key in inserted:
        tree.insert(key)
    for q in queries:
        assert tree.match(q) == _brute_match(inserted, q)
    distinct = {(k.tenant, k.blocks[:i]) for k in inserted for i in range(1, len(k.blocks) + 1)}
    assert tree.num_blocks == len(distinct)
    assert {(k.tenant, k.blocks) for k in tree.held_keys()} <= {(k.tenant, k.blocks) for k in inserted}


def _brute_lru(inserted: list[RoutingKey], capacity: int) -> set[tuple[str, tuple[int, ...]]]:
    """Nodes an LRU prefix cache keeps: replay inserts, evicting the least recently used leaf."""
    last: dict[tuple[str, tuple[int, ...]], int] = {}
    for t, key in enumerate(inserted):
        for i in range(1, min(len(key.blocks), capacity) + 1):
            last[(key.tenant, key.blocks[:i])] = t
        while len(last) > capacity:
            leaves = [n for n in last if not any(m[0] == n[0] and m[1][:-1] == n[1] for m in last)]
            del last[min(leaves, key=lambda n: last[n])]
    return set(last)


@settings(max_examples=300, deadline=None)
@given(st.lists(KEYS, max_size=25), st.integers(1, 8))
def test_bounded_tree_evicts_lru_leaves_as_brute_force(inserted: list[RoutingKey], capacity: int) -> None:
    tree = PrefixTree(capacity)
    for key in inserted:
        tree.insert(key)
    kept = _brute_lru(inserted, capacity)
    held = {(k.tenant, k.blocks[:i]) for k in tree.held_keys() for i in range(1, len(k.blocks) + 1)}
    assert held == kept
    assert tree.num_blocks == len(kept) <= capacity


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEYS, st.sampled_from(["r0", "r1", "r2"])), max_size=20), KEYS)
def test_prefix_router_never_uses_another_tenants_cache(history: list, query: RoutingKey) -> None:
    """Whatever other tenants sent, the decision is the one made with only the query's tenant's history."""
    router, own = PrefixRouter(RouterConfig(min_match=0.0)), PrefixRouter(RouterConfig(min_match=0.0))
    for key, replica in history:
        router.tree(replica).insert(key)
        own.tree(replica)  # the same replicas exist for both
        if key.tenant == query.tenant:
            own.tree(replica).insert(key)
    loads = {"r0": 0, "r1": 0, "r2": 0}
    mixed, alone = router.choose(query, loads), own.choose(query, loads)
    assert mixed.matched_blocks == alone.matched_blocks
    if mixed.reason == PREFIX_HIT:
        assert mixed.replica == alone.replica
        expected = max(_brute_match([k for k, r in history if r == mixed.replica], query), 0)
        assert mixed.matched_blocks == expected


def test_repeated_prefix_goes_to_the_same_replica_and_other_tenant_does_not_follow() -> None:
    router = make_router("prefix")
    loads = {"r0": 0, "r1": 0}
    first = RoutingKey("a", (1, 2, 3, 4))
    d0 = router.choose(first, loads)
    assert d0.reason == NO_MATCH
    router.routed(first, d0)
    again = router.choose(RoutingKey("a", (1, 2, 3, 9)), loads)
    assert (again.replica, again.reason, again.matched_blocks) == (d0.replica, PREFIX_HIT, 3)
    other = router.choose(RoutingKey("b", (1, 2, 3, 4)), loads)
    assert other.reason == NO_MATCH and other.replica != d0.replica  # ties: the emptier replica


def test_overloaded_best_replica_falls_back_to_least_loaded() -> None:
    config = RouterConfig(balance_abs=2, balance_rel=1.5)
    router = PrefixRouter(config)
    key = RoutingKey("a", (1, 2, 3))
    router.routed(key, router.choose(key, {"r0": 0, "r1": 1}))  # r0, the less loaded
    assert router.choose(key, {"r0": 2, "r1": 0}).reason == PREFIX_HIT  # 2 - 0 is not > 2
    fallback = router.choose(key, {"r0": 3, "r1": 0})
    assert (fallback.replica, fallback.reason) == ("r1", LOAD_FALLBACK)
    assert overloaded(3, 0, config) and not overloaded(3, 2, config) and not overloaded(2, 0, config)


def test_weak_match_goes_to_least_loaded() -> None:
    router = PrefixRouter(RouterConfig(min_match=0.5))
    router.routed(RoutingKey("a", (1, 2, 3, 4)), _decision("r0"))
    d = router.choose(RoutingKey("a", (1, 9, 9, 9)), {"r0": 1, "r1": 0})
    assert (d.replica, d.reason) == ("r1", NO_MATCH)


def _decision(replica: str) -> Decision:
    return Decision(replica, PREFIX_HIT)


def test_report_replaces_the_guess_and_removed_replica_is_forgotten() -> None:
    router = PrefixRouter()
    router.routed(RoutingKey("a", (1, 2)), _decision("r0"))
    router.replace_replica("r0", [RoutingKey("a", (7, 8))])
    assert router.tree("r0").match(RoutingKey("a", (1, 2))) == 0
    assert router.tree("r0").match(RoutingKey("a", (7, 8))) == 2
    router.remove_replica("r0")
    assert router.tree("r0").num_blocks == 0


def test_round_robin_and_least_load() -> None:
    rr, key = make_router("round_robin"), RoutingKey("", (1,))
    seen = []
    for _ in range(4):
        d = rr.choose(key, {"r1": 5, "r0": 0})
        rr.routed(key, d)
        seen.append((d.replica, d.reason))
    assert seen == [("r0", ROUND_ROBIN), ("r1", ROUND_ROBIN)] * 2
    assert make_router("least_load").choose(key, {"r0": 3, "r1": 1, "r2": 2}).replica == "r1"
    assert make_router("least_load").choose(key, {"r0": 3, "r1": 1}).reason == LEAST_LOAD


def test_unknown_router_bad_config_and_no_replicas_are_clear_errors() -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown router 'nope'; known routers: .*prefix"):
        make_router("nope")
    with pytest.raises(InvalidRequestError, match="min_match"):
        RouterConfig(min_match=2.0)
    with pytest.raises(InvalidRequestError, match="balance_rel"):
        RouterConfig(balance_rel=0.5)
    with pytest.raises(InvalidRequestError, match="capacity_blocks"):
        PrefixTree(0)
    for name in ROUTERS:
        with pytest.raises(InvalidRequestError, match="no replica"):
            make_router(name).choose(RoutingKey("", (1,)), {})


def test_text_keys_share_exactly_the_common_whole_chunks() -> None:
    a, b = "x" * 64 + "y" * 64 + "tail one", "x" * 64 + "y" * 64 + "tail two!"
    ka, kb = text_blocks(a), text_blocks(b)
    assert len(ka) == 3 and ka[:2] == kb[:2] and ka[2] != kb[2]
    assert text_blocks("z" * 63 + "w" * 65)[0] != ka[0]


def test_prompt_blocks_per_route_and_tenant_salt_in_the_key() -> None:
    chat = {"messages": [{"role": "system", "content": "s" * 100}, {"role": "user", "content": "hi"}]}
    longer = {"messages": [*chat["messages"], {"role": "assistant", "content": "yo"}]}
    c1 = prompt_blocks("/v1/chat/completions", json.dumps(chat).encode())
    c2 = prompt_blocks("/v1/chat/completions", json.dumps(longer).encode())
    assert c1 and c2[: len(c1) - 1] == c1[:-1]
    assert prompt_blocks("/v1/completions", json.dumps({"prompt": "p" * 70}).encode()) == text_blocks(
        "p" * 70
    )
    assert prompt_blocks("/v1/completions", json.dumps({"prompt": ["q", "r"]}).encode()) == text_blocks("q")
    assert prompt_blocks("/v1/completions", json.dumps({"prompt": list(range(40))}).encode())
    assert prompt_blocks("/v1/completions", b"not json") == ()
    assert prompt_blocks("/v1/models", b"") == ()
    body = json.dumps({"prompt": "p" * 70}).encode()
    ka, kb = routing_key("salt-a", "/v1/completions", body), routing_key("salt-b", "/v1/completions", body)
    assert ka.blocks == kb.blocks and ka.tenant != kb.tenant
    tree = PrefixTree()
    tree.insert(ka)
    assert tree.match(ka) == len(ka.blocks) and tree.match(kb) == 0
