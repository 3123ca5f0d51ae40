"""Which replica serves a request: the routers by name (prefix, round_robin, least_load).

A router sees a request's routing key and each candidate replica's load (its
requests in flight) and returns a `Decision`: the replica and why. The
cache-aware router, `prefix`, keeps one `PrefixTree` per replica and follows
SGLang's router: the replica with the longest held prefix of the key wins if
it holds at least `min_match` of the key's blocks and is not overloaded;
otherwise the least loaded replica does (ties: the one holding the fewest
blocks, so new prefixes spread). A replica is overloaded when its load exceeds
the least loaded one's by more than `balance_abs` requests and by a factor of
more than `balance_rel` (both must hold, as SGLang's imbalance test).

The router's trees are guesses: updated at once with each decision and
replaced by each replica's own report (`replace_replica`). This module has no
Ray import; kvengine/cluster/ray_router.py and kvengine/sim/routing.py use it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvengine.cluster.prefix_tree import PrefixTree, RoutingKey
from kvengine.errors import InvalidRequestError
from kvengine.registry import Registry

# Why a replica was chosen (the label of the routing-decision metrics).
PREFIX_HIT = "prefix_hit"  # the longest cached prefix, and not overloaded
LOAD_FALLBACK = "load_fallback"  # a prefix matched, but its replica was overloaded: least loaded instead
NO_MATCH = "no_match"  # no replica held enough of the prefix: least loaded
ROUND_ROBIN = "round_robin"
LEAST_LOAD = "least_load"
REASONS = (PREFIX_HIT, LOAD_FALLBACK, NO_MATCH, ROUND_ROBIN, LEAST_LOAD)


@dataclass(frozen=True)
class RouterConfig:
    """Thresholds of the cache-aware router (defaults as SGLang's router, scaled to small replicas)."""

    min_match: float = 0.3  # share of the key's blocks the best replica must hold
    balance_abs: int = 4  # requests in flight beyond the least loaded replica...
    balance_rel: float = 1.5  # ...and this factor above it, together: overloaded
    capacity_blocks: int | None = None  # each replica's tree (None: unbounded)

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_match <= 1.0:
            raise InvalidRequestError(f"min_match must be in [0, 1], got {self.min_match}")
        if self.balance_abs < 0:
            raise InvalidRequestError(f"balance_abs must be >= 0, got {self.balance_abs}")
        if self.balance_rel < 1.0:
            raise InvalidRequestError(f"balance_rel must be >= 1, got {self.balance_rel}")
        if self.capacity_blocks is not None and self.capacity_blocks < 1:
            raise InvalidRequestError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")


@dataclass(frozen=True)
class Decision:
    """The chosen replica, why, and how many of the key's blocks it was believed to hold."""

    replica: str
    reason: str
    matched_blocks: int = 0


def overloaded(load: int, min_load: int, config: RouterConfig) -> bool:
    """SGLang's imbalance test between one load and the smallest."""
    return load - min_load > config.balance_abs and load > min_load * config.balance_rel


class Router(ABC):
    """Chooses a replica per request; `loads` maps each candidate replica to its requests in flight.

    `choose` never changes state; `routed` records a decision (the trees of a
    cache-aware router). Replicas are named by strings; a router forgets one
    with `remove_replica`. Raises InvalidRequestError when `loads` is empty.
    """

    def __init__(self, config: RouterConfig | None = None) -> None:
        self.config = config or RouterConfig()

    @abstractmethod
    def choose(self, key: RoutingKey, loads: Mapping[str, int]) -> Decision: ...

    def routed(self, key: RoutingKey, decision: Decision) -> None:  # noqa: B027 (no state by default)
        """Record that `key` went to `decision.replica`."""

    def replace_replica(self, replica: str, keys: Iterable[RoutingKey]) -> None:  # noqa: B027
        """Take a replica's own report of the keys it holds, in place of the router's guess."""

    def remove_replica(self, replica: str) -> None:  # noqa: B027
        """Forget a replica that is gone."""


ROUTERS: Registry[Router] = Registry("router", "routers")


def make_router(name: str, config: RouterConfig | None = None) -> Router:
    """A router by registered name; InvalidRequestError naming the known ones otherwise."""
    return ROUTERS.lookup(name)(config)


def _candidates(loads: Mapping[str, int]) -> list[str]:
    if not loads:
        raise InvalidRequestError("no replica to route to")
    return sorted(loads)


@ROUTERS.register("round_robin")
class RoundRobinRouter(Router):
    """Each request to the next replica in name order, whatever it holds."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self._next = 0

    def choose(self, key: RoutingKey, loads: Mapping[str, int]) -> Decision:
        names = _candidates(loads)
        return Decision(names[self._next % len(names)], ROUND_ROBIN)

    def routed(self, key: RoutingKey, decision: Decision) -> None:
        self._next += 1


@ROUTERS.register("least_load")
class LeastLoadRouter(Router):
    """The replica with the fewest requests in flight (ties: name order), whatever it holds."""

    def choose(self, key: RoutingKey, loads: Mapping[str, int]) -> Decision:
        return Decision(min(_candidates(loads), key=lambda r: loads[r]), LEAST_LOAD)


@ROUTERS.register("prefix")
class PrefixRouter(Router):
    """Longest cached prefix of the request's own tenant, unless that replica is overloaded (see module)."""

    def __init__(self, config: RouterConfig | None = None) -> None:
        super().__init__(config)
        self.trees: dict[str, PrefixTree] = {}

    def tree(self, replica: str) -> PrefixTree:
        """The router's guess of what `replica` holds (made empty on first use)."""
        if replica not in self.trees:
            self.trees[replica] = PrefixTree(self.config.capacity_blocks)
        return self.trees[replica]

    def choose(self, key: RoutingKey, loads: Mapping[str, int]) -> Decision:
        names = _candidates(loads)
        min_load = min(loads.values())
        matches = {r: self.tree(r).match(key) for r in names}
        best = max(names, key=lambda r: (matches[r], -loads[r]))  # longest match; then less loaded
        fallback = min(names, key=lambda r: (loads[r], self.tree(r).num_blocks))
        if not key.blocks or matches[best] < max(1, self.config.min_match * len(key.blocks)):
            return Decision(fallback, NO_MATCH, matches[fallback])
        if overloaded(loads[best], min_load, self.config):
            return Decision(fallback, LOAD_FALLBACK, matches[fallback])
        return Decision(best, PREFIX_HIT, matches[best])

    def routed(self, key: RoutingKey, decision: Decision) -> None:
        self.tree(decision.replica).insert(key)

    def replace_replica(self, replica: str, keys: Iterable[RoutingKey]) -> None:
        tree = self.tree(replica)
        tree.clear()
        for key in keys:
            tree.insert(key)

    def remove_replica(self, replica: str) -> None:
        self.trees.pop(replica, None)
