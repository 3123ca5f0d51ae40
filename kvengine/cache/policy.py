"""Eviction policies of the prefix cache: which cached blocks go first.

A policy only orders the candidates the radix tree shows it (its unlocked
leaves); the tree enforces every invariant (leaves only, never a locked node,
whole prefixes stay). Policies are registered by name, the one registry the
Python API, the CLI and the simulator share:

- "lru": least recently used first (SGLang's default);
- "lfu": least frequently used first, LRU among equals;
- "gdsf": Greedy-Dual-Size-Frequency, LFU that ages (Cherkasova 1998);
- "predictive": evict what is predicted not to be reused soon first, LRU
  among equals (after Antoniadis et al., "Paging with Succinct Predictions",
  arXiv:2210.02775);
- "belady": the offline optimum (Belady's MIN). It needs the future, so only
  the trace simulator can build it; it is a bound, not a policy to serve with.
"""

from __future__ import annotations

import bisect
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry


class TreeNode(Protocol):
    """What a policy sees of a node of the radix tree (`radix.RadixNode`; see its doc).

    A protocol rather than an import, so the tree depends on its policies and
    not the other way round.
    """

    key: tuple[int, ...]  # the edge's tokens, whole blocks
    namespace: Hashable
    start: int  # tokens above the edge
    node_id: int  # grows with creation: the tie-breaker
    policy_state: Any  # the policy's own, see EvictionPolicy

    @property
    def num_blocks(self) -> int: ...


class EvictionPolicy(ABC):
    """Orders the eviction candidates of a `RadixCache`; the tree enforces the invariants.

    Hooks, all called by the tree; `now` is the tree's clock, one tick per insert:

    - `on_insert(node, now)`: `node` is a new leaf holding newly cached blocks;
    - `on_access(node, now)`: an inserted path went through `node` (one call per
      node per insert: a request's prompt is inserted once, after it ran);
    - `on_split(upper, lower)`: an edge was cut; `upper` is the new node above
      `lower` and has seen exactly the accesses `lower` has;
    - `on_evict(node, num_blocks)`: the last `num_blocks` blocks of `node` are
      about to be evicted (all of them: the node leaves the tree).

    `priority(node, block)` is the sort key of block `block` (0: the first)
    of candidate `node`: of the candidates' last blocks, the one with the
    smallest key is evicted next. A key ends with `node.node_id`, so
    candidates never tie, and computing it must not change the tree. One
    `evict` call computes each key once and keeps it, so a key must not
    change when other nodes' blocks go (it may change between calls, with the
    clock). A key that ignores `block` makes a node go whole before the next.

    Per-node data lives in `node.policy_state`; keep it immutable (tuples) so
    the default `on_split` can share it. Data about the whole cache (GDSF's
    inflation, the predictive policy's ghosts) lives in the policy object.
    """

    clairvoyant: ClassVar[bool] = False  # True: needs the future (offline bound only)

    def on_insert(self, node: TreeNode, now: int) -> None:
        self.on_access(node, now)

    def on_access(self, node: TreeNode, now: int) -> None:  # noqa: B027 (optional hook)
        pass

    def on_split(self, upper: TreeNode, lower: TreeNode) -> None:
        upper.policy_state = lower.policy_state

    def on_evict(self, node: TreeNode, num_blocks: int) -> None:  # noqa: B027 (optional hook)
        pass

    @abstractmethod
    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        """Sort key of block `block` of candidate `node`: the smallest goes first (see the class doc)."""


POLICIES: Registry[EvictionPolicy] = Registry("eviction policy", "policies")
register_policy = POLICIES.register


def make_policy(name: str, **kwargs: Any) -> EvictionPolicy:
    """The policy registered as `name`, built with `kwargs` (its dataclass fields)."""
    cls = POLICIES.lookup(name)
    if cls.clairvoyant and "future" not in kwargs:
        raise InvalidRequestError(
            f"eviction policy {name!r} is an offline bound: it needs the future trace, "
            "which only the simulator has (kvengine simulate)"
        )
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise InvalidRequestError(f"bad arguments for eviction policy {name!r}: {exc}") from None


def online_policy_names() -> list[str]:
    """Registered policies that need no knowledge of the future, in registration order."""
    return [name for name, cls in POLICIES.items() if not cls.clairvoyant]


@register_policy("lru")
@dataclass
class LRU(EvictionPolicy):
    """Least recently used first. State: the clock of the last access."""

    def on_access(self, node: TreeNode, now: int) -> None:
        node.policy_state = now

    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        return (node.policy_state, node.node_id)


@register_policy("lfu")
@dataclass
class LFU(EvictionPolicy):
    """Fewest accesses first, least recently used among equals. State: (accesses, last access)."""

    def on_insert(self, node: TreeNode, now: int) -> None:
        node.policy_state = (1, now)

    def on_access(self, node: TreeNode, now: int) -> None:
        node.policy_state = (node.policy_state[0] + 1, now)

    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        return (*node.policy_state, node.node_id)


@register_policy("gdsf")
@dataclass
class GDSF(EvictionPolicy):
    """Greedy-Dual-Size-Frequency (Cherkasova 1998): lowest `H = L + frequency * cost / size` first.

    `L`, the inflation value, rises to the `H` of each evicted node, so entries
    popular long ago age out (plain LFU never forgets). The tree evicts block
    by block, so `cost / size` is `cost_per_block`, uniform here: a seam for a
    cost model where deep blocks cost more to recompute. State: (H, frequency).
    """

    inflation: float = field(default=0.0, init=False)

    def cost_per_block(self, node: TreeNode) -> float:
        return 1.0

    def on_insert(self, node: TreeNode, now: int) -> None:
        node.policy_state = (self.inflation + self.cost_per_block(node), 1)

    def on_access(self, node: TreeNode, now: int) -> None:
        frequency = node.policy_state[1] + 1
        node.policy_state = (self.inflation + frequency * self.cost_per_block(node), frequency)

    def on_evict(self, node: TreeNode, num_blocks: int) -> None:
        self.inflation = max(self.inflation, node.policy_state[0])

    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        return (node.policy_state[0], node.node_id)


@register_policy("predictive")
@dataclass
class Predictive(EvictionPolicy):
    """Evict blocks predicted not to be reused soon first, LRU among equals.

    After "Paging with Succinct Predictions" (Antoniadis et al. 2023,
    arXiv:2210.02775), where one predicted bit per page, "reused soon or not",
    is enough to beat LRU when the predictions are good. The bit comes from
    the node's history: reused soon if it was reused before and the time
    since its last access is at most `slack` times the median of its last
    `history` inter-arrival times (an overdue node is predicted dead; a node
    never reused is predicted dead too).

    Evicted blocks leave a ghost (their history) for `max_ghosts` evictions,
    so a prefix that comes back after eviction keeps its inter-arrival times:
    without that, only prefixes reused while cached would ever have any. A
    ghost is keyed by namespace, position and the block's tokens: a
    collision only costs a wrong prediction, never a wrong hit.
    State: (last access, recent inter-arrival times).
    """

    history: int = 4
    slack: float = 4.0
    max_ghosts: int = 1 << 16
    _now: int = field(default=0, init=False, repr=False)
    _ghosts: dict[Hashable, tuple[int, tuple[int, ...]]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.history < 1:
            raise InvalidRequestError(f"predictive: history must be >= 1, got {self.history}")
        if not self.slack > 0:
            raise InvalidRequestError(f"predictive: slack must be > 0, got {self.slack}")
        if self.max_ghosts < 0:
            raise InvalidRequestError(f"predictive: max_ghosts must be >= 0, got {self.max_ghosts}")

    def on_insert(self, node: TreeNode, now: int) -> None:
        # The most recent ghost among the new blocks stands for the node's past.
        ghosts = [self._ghosts.pop(self._ghost_key(node, j), None) for j in range(node.num_blocks)]
        past = max((g for g in ghosts if g is not None), default=None)
        node.policy_state = (now, ())
        if past is not None:
            node.policy_state = past
            self.on_access(node, now)
        self._now = now

    def on_access(self, node: TreeNode, now: int) -> None:
        self._now = now
        last, gaps = node.policy_state
        node.policy_state = (now, (*gaps, now - last)[-self.history :])

    def on_evict(self, node: TreeNode, num_blocks: int) -> None:
        if self.max_ghosts == 0:
            return
        for j in range(node.num_blocks - num_blocks, node.num_blocks):
            self._ghosts[self._ghost_key(node, j)] = node.policy_state
        while len(self._ghosts) > self.max_ghosts:  # oldest ghost first (dicts keep insertion order)
            del self._ghosts[next(iter(self._ghosts))]

    @staticmethod
    def _ghost_key(node: TreeNode, block: int) -> Hashable:
        block_size = len(node.key) // node.num_blocks
        end = (block + 1) * block_size
        return (node.namespace, node.start + end, node.key[end - block_size : end])

    def predicts_reuse(self, node: TreeNode) -> bool:
        last, gaps = node.policy_state
        return bool(gaps) and self._now - last <= self.slack * statistics.median(gaps)

    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        return (self.predicts_reuse(node), node.policy_state[0], node.node_id)


@register_policy("belady")
@dataclass
class Belady(EvictionPolicy):
    """The offline optimum (Belady's MIN, 1966): evict the block whose next use is farthest.

    It needs the future: `future[i]` lists the tokens of request `i` in the
    order requests are served, and the simulator calls `advance(i)` before
    serving request `i`. A block is named by its last token, so the tokens
    must name a block together with its whole prefix: the simulator's
    canonical block ids, one token per block. Next uses only grow down a path,
    so the farthest block is always the last block of some leaf.
    """

    future: Sequence[Sequence[int]]
    clairvoyant: ClassVar[bool] = True
    _uses: dict[int, list[int]] = field(default_factory=dict, init=False, repr=False)
    _now: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        for i, tokens in enumerate(self.future):
            for token in tokens:
                uses = self._uses.setdefault(token, [])
                if not uses or uses[-1] != i:
                    uses.append(i)

    def advance(self, request_index: int) -> None:
        """Serve request `request_index` next: next uses are counted after it."""
        self._now = request_index

    def next_use(self, token: int) -> float:
        """Index of the next request after the current one that uses block `token` (inf: none)."""
        uses = self._uses.get(token, [])
        i = bisect.bisect_right(uses, self._now)
        return uses[i] if i < len(uses) else math.inf

    def priority(self, node: TreeNode, block: int) -> tuple[Any, ...]:
        # A block is named by its last token. Next uses do not grow going up a path,
        # so a leaf's blocks come out last first and the farthest is always a leaf's last.
        block_size = len(node.key) // node.num_blocks
        return (-self.next_use(node.key[(block + 1) * block_size - 1]), node.node_id)
