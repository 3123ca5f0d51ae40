"""An approximate prefix tree of what one replica holds: routing keys per tenant, LRU-bounded.

A routing key is a tenant salt and a sequence of block hashes (one per block of
the prompt; a block's hash names its contents, its position names its prefix).
The tree keeps, per tenant, the keys a replica is believed to hold: inserted
when a request is routed there or reported by the replica itself, and evicted
least-recently-used leaf first once it holds more than `capacity_blocks`,
as the replica's own prefix cache does. It is a guess of the replica's cache,
never the cache itself: the router only uses it to rank replicas.

Tenants never share nodes: `match` walks only the tree of the key's own
tenant, so one tenant's prompts cannot be steered by another's cache.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from kvengine.errors import InvalidRequestError


@dataclass(frozen=True)
class RoutingKey:
    """What a request is routed by: its tenant salt and its prompt's block hashes, in order."""

    tenant: str
    blocks: tuple[int, ...]


@dataclass(eq=False)
class _Node:
    block: int
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)
    last_use: int = 0


class PrefixTree:
    """Routing keys one replica is believed to hold; at most `capacity_blocks` blocks (None: unbounded)."""

    def __init__(self, capacity_blocks: int | None = None) -> None:
        if capacity_blocks is not None and capacity_blocks < 1:
            raise InvalidRequestError(f"capacity_blocks must be >= 1, got {capacity_blocks}")
        self.capacity_blocks = capacity_blocks
        self._roots: dict[str, _Node] = {}
        self._num_blocks = 0
        self._clock = 0
        self._leaves: list[tuple[int, int, _Node]] = []  # lazy heap: (last use, tie, node)
        self._tie = itertools.count()

    @property
    def num_blocks(self) -> int:
        """Blocks held, over all tenants."""
        return self._num_blocks

    def match(self, key: RoutingKey) -> int:
        """Blocks of `key` held, from its start: the longest held prefix of the tenant's own tree."""
        node = self._roots.get(key.tenant)
        n = 0
        while node is not None and n < len(key.blocks):
            node = node.children.get(key.blocks[n])
            n += node is not None
        return n

    def insert(self, key: RoutingKey) -> None:
        """Hold `key` (its first `capacity_blocks` blocks), marking its path used now; evict LRU leaves."""
        blocks = key.blocks[: self.capacity_blocks] if self.capacity_blocks else key.blocks
        if not blocks:
            return
        self._clock += 1
        node = self._roots.setdefault(key.tenant, _Node(block=-1, parent=None))
        for block in blocks:
            child = node.children.get(block)
            if child is None:
                child = node.children[block] = _Node(block=block, parent=node)
                self._num_blocks += 1
            child.last_use = self._clock
            node = child
        self._push_leaf(node)
        if self.capacity_blocks is not None:
            self._evict(self._num_blocks - self.capacity_blocks)

    def held_keys(self) -> Iterator[RoutingKey]:
        """Every held key ending at a leaf (together they describe the whole tree)."""
        for tenant, root in self._roots.items():
            stack: list[tuple[_Node, tuple[int, ...]]] = [(root, ())]
            while stack:
                node, path = stack.pop()
                if not node.children and path:
                    yield RoutingKey(tenant, path)
                stack += [(c, (*path, b)) for b, c in node.children.items()]

    def clear(self) -> None:
        """Forget everything (a replica that restarted holds nothing)."""
        self._roots.clear()
        self._leaves.clear()
        self._num_blocks = 0

    def _push_leaf(self, node: _Node) -> None:
        heapq.heappush(self._leaves, (node.last_use, next(self._tie), node))

    def _evict(self, num_blocks: int) -> None:
        """Drop `num_blocks` blocks, least recently used leaves first."""
        while num_blocks > 0 and self._leaves:
            last_use, _, node = heapq.heappop(self._leaves)
            if node.children or node.last_use != last_use or node.parent is None:
                continue  # stale entry: since used again, no longer a leaf, or already evicted
            parent = node.parent
            del parent.children[node.block]
            node.parent = None
            self._num_blocks -= 1
            num_blocks -= 1
            if parent.parent is not None and not parent.children:
                self._push_leaf(parent)
