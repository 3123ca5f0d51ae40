"""The cluster's Ray Serve request router: kvengine's routing core behind Ray's `RequestRouter` API.

Ray builds one `KvengineRequestRouter` inside each handle to the engine
deployment (here: in the ingress). For every request it reads the routing key
the ingress put in the call's keyword arguments (`route_key`: tenant salt and
block hashes), the replicas' loads (requests this router has in flight on
each) and their latest reports (`RunningReplica.routing_stats`, filled by
`EngineReplica.record_routing_stats`), and asks the router from
`kvengine.cluster.routing` chosen by name (`router` in the config's
`request_router_kwargs`). A new report replaces the router's tree of that
replica (keys routed there since are inserted again); a replica that died is
forgotten, and its replacement starts empty.

Each decision also travels with the request (`route`: the chosen replica and
the reason), so that the replica counts the decisions that brought it requests
and reports them with its other counters for the cluster's /metrics.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from kvengine.cluster.prefix_tree import RoutingKey
from kvengine.cluster.routing import Decision, Router, RouterConfig, make_router

REPORT_GRACE_S = 30.0  # keys routed this recently are kept over a report that may predate them


def _key(pending: PendingRequest | None) -> RoutingKey:
    raw = pending.kwargs.get("key") if pending is not None else None
    if not raw:
        return RoutingKey("", ())
    return RoutingKey(str(raw[0]), tuple(int(b) for b in raw[1]))


class KvengineRequestRouter(RequestRouter):
    """Ray Serve request router over a `kvengine.cluster.routing.Router` (see module docstring)."""

    def initialize_state(self, **kwargs: Any) -> None:
        name = kwargs.pop("router", "prefix")
        self.router_name = name
        self.core: Router = make_router(name, RouterConfig(**kwargs))
        self.in_flight: Counter[str] = Counter()
        self.decisions: Counter[tuple[str, str]] = Counter()  # (replica, reason)
        self._chosen: dict[str, tuple[RoutingKey, Decision]] = {}  # request id -> its decision
        self._dispatched: dict[str, str] = {}  # request id -> replica
        self._seen_reports: dict[str, tuple[str, int]] = {}  # replica -> (instance, requests) last taken
        self._recent: dict[str, deque[tuple[float, RoutingKey]]] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_name = {r.replica_id.unique_id: r for r in candidate_replicas}
        for name, replica in by_name.items():
            self._take_report(name, replica.routing_stats or {})
        key = _key(pending_request)
        decision = self.core.choose(key, {n: self.in_flight[n] for n in by_name})
        if pending_request is not None:
            self._chosen[pending_request.metadata.internal_request_id] = (key, decision)
            # Sent with the request: the replica counts its routing decisions for /metrics.
            pending_request.kwargs["route"] = [decision.replica, decision.reason]
        chosen = by_name[decision.replica]
        rest = [r for n, r in by_name.items() if n != decision.replica]
        rest.sort(key=lambda r: self.in_flight[r.replica_id.unique_id])
        return [[chosen], rest] if rest else [[chosen]]  # the rest only if the chosen one refuses

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        request_id = pending_request.metadata.internal_request_id
        name = replica_id.unique_id
        key, decision = self._chosen.pop(request_id, (_key(pending_request), None))
        if decision is None or decision.replica != name:
            decision = Decision(name, "load_fallback")  # Ray sent it elsewhere (the chosen one was full)
        self.core.routed(key, decision)
        self.decisions[(name, decision.reason)] += 1
        self.in_flight[name] += 1
        self._dispatched[request_id] = name
        if key.blocks:
            self._recent.setdefault(name, deque(maxlen=1024)).append((time.monotonic(), key))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        name = self._dispatched.pop(internal_request_id, replica_id.unique_id)
        self.in_flight[name] = max(0, self.in_flight[name] - 1)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        name = replica_id.unique_id
        self.core.remove_replica(name)
        self._seen_reports.pop(name, None)
        self._recent.pop(name, None)
        self.in_flight.pop(name, None)

    def _take_report(self, name: str, stats: dict[str, Any]) -> None:
        """Replace the tree of `name` by its report, once per new report."""
        if "instance" not in stats:
            return
        stamp = (str(stats["instance"]), int(stats.get("requests", 0)))
        if self._seen_reports.get(name) == stamp:
            return
        self._seen_reports[name] = stamp
        keys = [RoutingKey(str(t), tuple(int(b) for b in blocks)) for t, blocks in stats.get("keys", [])]
        recent = self._recent.get(name, deque())
        while recent and recent[0][0] < time.monotonic() - REPORT_GRACE_S:
            recent.popleft()
        self.core.replace_replica(name, [*keys, *(k for _, k in recent)])
