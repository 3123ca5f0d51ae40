"""The prefix cache: a radix tree over token ids, in whole blocks (RadixAttention).

After SGLang's RadixAttention (Zheng et al. 2023, arXiv:2312.07104). Every
edge holds a whole number of blocks of `block_size` tokens, and each block
maps to one opaque value: the engine stores a handle of KV blocks there, the
simulator a block id. A partial last block is never cached, because its KV
would change as soon as the sequence grows.

Keys start with a namespace (model, press configuration, tenant salt: any
hashable), and each namespace has its own root, so two tenants never share a
block and one tenant's prompts never speed up another's.

The tree enforces the invariants; the `EvictionPolicy` only orders candidates:

- a node's children have distinct first blocks (with `block_size=1`, distinct
  first tokens); every non-root edge holds at least one block;
- `num_evictable_blocks + num_locked_blocks == num_cached_blocks`;
- only leaves are evicted, from their last block backwards, and never a locked
  one; lock counts go up the whole path, so an ancestor of a locked node is
  locked too and what stays cached is always a set of whole prefixes.

The tree's clock, the time its policy sees, advances once per `insert`.

The tree knows nothing about the pool: it hands values back to the caller
(from `insert` for duplicates, from `evict` for evicted blocks) to free.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvengine.cache.policy import EvictionPolicy, make_policy


@dataclass(eq=False)
class RadixNode:
    """One edge of the tree and the node it leads to (compared by identity).

    `key` holds the edge's tokens, `len(values) * block_size` of them;
    `start` is the number of tokens above the edge; `lock_ref` counts the
    locks whose path passes through this node; `node_id` grows with creation
    (a tie-breaker for policies). `policy_state` belongs to the policy alone.
    """

    key: tuple[int, ...]
    values: list[Any]
    parent: RadixNode | None
    namespace: Hashable = None
    start: int = 0
    lock_ref: int = 0
    node_id: int = 0
    children: dict[tuple[int, ...], RadixNode] = field(default_factory=dict)
    policy_state: Any = None

    @property
    def num_blocks(self) -> int:
        return len(self.values)

    @property
    def is_root(self) -> bool:
        return self.parent is None


@dataclass(frozen=True)
class MatchResult:
    """The cached prefix of a token sequence.

    `num_tokens` matched tokens (whole blocks), their `values` (one per
    block), and `last_node`, the node that ends with the last matched block
    (the namespace root when nothing matched). Lock `last_node` before using
    the values: unlocked, they may be evicted by the next `evict`.
    """

    num_tokens: int
    values: list[Any]
    last_node: RadixNode


class RadixCache:
    """A block-aligned radix tree of cached prefixes with pluggable eviction.

    `policy` is an `EvictionPolicy` or a registered name ("lru", "lfu",
    "gdsf", "predictive").
    """

    def __init__(self, block_size: int, policy: EvictionPolicy | str = "lru") -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._roots: dict[Hashable, RadixNode] = {}
        # Unlocked leaves: the eviction candidates. A dict, as an ordered set, keeps
        # the candidate order (and so any tie between candidates) deterministic.
        self._leaves: dict[RadixNode, None] = {}
        self._clock = 0
        self._node_ids = itertools.count(1)
        self.num_cached_blocks = 0
        self.num_locked_blocks = 0

    @property
    def num_evictable_blocks(self) -> int:
        """Cached blocks not held by a lock (all of them can be evicted, leaves first)."""
        return self.num_cached_blocks - self.num_locked_blocks

    def root(self, namespace: Hashable = None) -> RadixNode:
        """The root of `namespace` (created empty on first use)."""
        node = self._roots.get(namespace)
        if node is None:
            node = self._roots[namespace] = RadixNode(key=(), values=[], parent=None, namespace=namespace)
        return node

    # ---- lookup and insertion ---------------------------------------------

    def match_prefix(self, tokens: Sequence[int], namespace: Hashable = None) -> MatchResult:
        """The longest cached prefix of `tokens` in `namespace`, in whole blocks.

        Does not change what is cached, nor the policy's view of it (an access
        is recorded by `insert`). Where the match ends inside an edge, the node
        is split there, so that locking `last_node` protects exactly the matched
        blocks. The values are only safe to use while `last_node` is locked.
        """
        bs, tokens = self.block_size, tuple(tokens)
        node, pos, values = self.root(namespace), 0, []
        while pos + bs <= len(tokens):
            child = node.children.get(tokens[pos : pos + bs])
            if child is None:
                break
            k = self._common_blocks(child.key, tokens, pos)
            partial = k < child.num_blocks
            if partial:
                child = self._split(child, k)
            values += child.values
            node, pos = child, pos + k * bs
            if partial:
                break
        return MatchResult(pos, values, node)

    def insert(self, tokens: Sequence[int], values: Sequence[Any], namespace: Hashable = None) -> int:
        """Cache the whole blocks of `tokens`; returns the number of tokens newly inserted.

        `values` has one entry per whole block (a partial last block of
        `tokens` is ignored). With `n` the return value, the tree takes the
        last `n // block_size` values; the first ones belong to blocks that were
        already cached and stay the caller's to free (unless they are the very
        values `match_prefix` returned). Records one access on every node of the
        path, and splits a node where the path ends inside it, so that the
        policy's history is exact per node.
        """
        bs = self.block_size
        num_blocks = len(tokens) // bs
        if len(values) != num_blocks:
            raise ValueError(f"insert: {num_blocks} whole blocks of tokens but {len(values)} values")
        tokens = tuple(tokens[: num_blocks * bs])
        self._clock += 1
        node, pos = self.root(namespace), 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos : pos + bs])
            if child is None:
                self._add_leaf(node, tokens[pos:], list(values[pos // bs :]))
                return len(tokens) - pos
            k = self._common_blocks(child.key, tokens, pos)
            if k < child.num_blocks:
                child = self._split(child, k)
            self.policy.on_access(child, self._clock)
            node, pos = child, pos + k * bs
        return 0

    def _common_blocks(self, key: tuple[int, ...], tokens: tuple[int, ...], pos: int) -> int:
        """Number of whole blocks `key` shares with `tokens[pos:]`."""
        bs = self.block_size
        end = min(len(key), (len(tokens) - pos) // bs * bs)
        if key[:end] == tokens[pos : pos + end]:
            return end // bs
        k = 0
        while k < end // bs and key[k * bs : (k + 1) * bs] == tokens[pos + k * bs : pos + (k + 1) * bs]:
            k += 1
        return k

    def _add_leaf(self, parent: RadixNode, key: tuple[int, ...], values: list[Any]) -> None:
        bs = self.block_size
        start = parent.start + len(parent.key)
        leaf = RadixNode(key, values, parent, parent.namespace, start, node_id=next(self._node_ids))
        parent.children[key[:bs]] = leaf
        self._leaves.pop(parent, None)
        self._leaves[leaf] = None
        self.num_cached_blocks += leaf.num_blocks
        self.policy.on_insert(leaf, self._clock)

    def _split(self, node: RadixNode, num_blocks: int) -> RadixNode:
        """Cut `node`'s edge after `num_blocks` blocks; returns the new upper node.

        `node` keeps its identity as the lower part, so a `last_node` a caller
        holds still unlocks the whole path. The upper node inherits the lock
        count and the policy state: every path through one went through the other.
        """
        bs, cut = self.block_size, num_blocks * self.block_size
        assert node.parent is not None and 0 < num_blocks < node.num_blocks
        upper = RadixNode(
            key=node.key[:cut],
            values=node.values[:num_blocks],
            parent=node.parent,
            namespace=node.namespace,
            start=node.start,
            lock_ref=node.lock_ref,
            node_id=next(self._node_ids),
        )
        node.parent.children[node.key[:bs]] = upper
        node.key, node.values, node.parent = node.key[cut:], node.values[num_blocks:], upper
        node.start += cut
        upper.children[node.key[:bs]] = node
        self.policy.on_split(upper, node)
        return upper

    # ---- locks --------------------------------------------------------------

    def lock(self, node: RadixNode) -> None:
        """Protect `node` and its ancestors from eviction until `unlock(node)`."""
        if node.is_root:
            return
        self._leaves.pop(node, None)
        n = node
        while n.parent is not None:
            if n.lock_ref == 0:
                self.num_locked_blocks += n.num_blocks
            n.lock_ref += 1
            n = n.parent

    def unlock(self, node: RadixNode) -> None:
        """Undo one `lock(node)`."""
        if node.is_root:
            return
        if node.lock_ref < 1:
            raise ValueError("unlock of a node that is not locked")
        n = node
        while n.parent is not None:
            n.lock_ref -= 1
            if n.lock_ref == 0:
                self.num_locked_blocks -= n.num_blocks
            n = n.parent
        if node.lock_ref == 0 and not node.children:
            self._leaves[node] = None

    # ---- eviction -------------------------------------------------------------

    def evict(self, num_blocks: int) -> list[Any]:
        """Evict up to `num_blocks` unlocked blocks, leaves first; returns their values.

        Fewer come back only when fewer are evictable. The next block to go is
        always the one with the smallest policy priority among the candidates'
        last blocks; a parent emptied of its children becomes a candidate at once.
        """
        # Keys hold for the whole call (see EvictionPolicy), so one heap serves it:
        # an emptied leaf's parent is pushed, not every candidate sorted again.
        heap = [self._heap_entry(node) for node in self._leaves] if num_blocks > 0 else []
        heapq.heapify(heap)
        evicted: list[Any] = []
        while len(evicted) < num_blocks and heap:
            _, _, node = heapq.heappop(heap)
            first_block = node.key[: self.block_size]
            take = self._run_length(node, heap[0][0] if heap else None, num_blocks - len(evicted))
            evicted += self._evict_tail(node, take)
            if node.num_blocks:
                heapq.heappush(heap, self._heap_entry(node))
            elif (parent := self._remove_leaf(node, first_block)) is not None:
                heapq.heappush(heap, self._heap_entry(parent))
        return evicted

    def _heap_entry(self, node: RadixNode) -> tuple[tuple[Any, ...], int, RadixNode]:
        """A candidate keyed by its last block; the node id keeps nodes themselves from being compared."""
        return (self.policy.priority(node, node.num_blocks - 1), node.node_id, node)

    def _run_length(self, node: RadixNode, next_key: tuple[Any, ...] | None, limit: int) -> int:
        """How many of `node`'s last blocks go before the candidate keyed `next_key` (at most `limit`).

        Counted before any goes, so the policy hears of the whole run in one `on_evict`.
        """
        take, end = 1, min(limit, node.num_blocks)
        while take < end and (
            next_key is None or self.policy.priority(node, node.num_blocks - 1 - take) < next_key
        ):
            take += 1
        return take

    def _evict_tail(self, node: RadixNode, num_blocks: int) -> list[Any]:
        self.policy.on_evict(node, num_blocks)
        cut = len(node.values) - num_blocks
        taken = node.values[cut:]
        node.values, node.key = node.values[:cut], node.key[: cut * self.block_size]
        self.num_cached_blocks -= num_blocks
        return taken[::-1]  # the deepest block went first

    def _remove_leaf(self, node: RadixNode, first_block: tuple[int, ...]) -> RadixNode | None:
        """Detach an emptied leaf; returns its parent if that became a candidate."""
        parent = node.parent
        assert parent is not None
        del parent.children[first_block]
        del self._leaves[node]
        if parent.parent is not None and not parent.children and parent.lock_ref == 0:
            self._leaves[parent] = None
            return parent
        return None

    # ---- checks ---------------------------------------------------------------

    def nodes(self) -> list[RadixNode]:
        """Every non-root node, parents before children."""
        out: list[RadixNode] = []
        stack = list(self._roots.values())
        while stack:
            node = stack.pop()
            if not node.is_root:
                out.append(node)
            stack.extend(node.children.values())
        return out

    def check_invariants(self) -> None:
        """Raise AssertionError if the tree, its lock counts or its counters disagree."""
        bs, cached, locked, leaves = self.block_size, 0, 0, set()
        for node in self.nodes():
            parent = node.parent
            assert parent is not None
            assert node.num_blocks >= 1 and len(node.key) == node.num_blocks * bs, "edge not whole blocks"
            assert parent.children.get(node.key[:bs]) is node, "child not under its first block"
            assert node.start == parent.start + len(parent.key), "start does not follow the parent"
            assert node.lock_ref >= sum(c.lock_ref for c in node.children.values()), "lock count not on path"
            cached += node.num_blocks
            locked += node.num_blocks if node.lock_ref > 0 else 0
            if not node.children and node.lock_ref == 0:
                leaves.add(node)
        assert cached == self.num_cached_blocks, (
            f"{cached} blocks cached, counter says {self.num_cached_blocks}"
        )
        assert locked == self.num_locked_blocks, (
            f"{locked} blocks locked, counter says {self.num_locked_blocks}"
        )
        assert self.num_evictable_blocks + self.num_locked_blocks == self.num_cached_blocks
        assert leaves == set(self._leaves), "candidate set is not the unlocked leaves"
