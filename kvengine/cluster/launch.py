"""Starting the cluster: Ray (local or joined), then the engine deployment and its ingress on Ray Serve.

`build_app` describes the Serve application: `EngineReplica` as a deployment
of `num_replicas` copies (each with `num_cpus` / `num_gpus` of Ray's
resources, restarted by Ray when it dies or fails its health check), routed
by `KvengineRequestRouter`, behind one `Ingress`. `start` connects to Ray
(`ray_address`, or a new local instance of `local_num_cpus` CPUs without
dashboard), starts Serve's HTTP proxy on `host:port` and deploys the app;
`stop` tears it down. Nothing here serves a request itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from kvengine.cluster.ingress import Ingress
from kvengine.cluster.ray_router import KvengineRequestRouter
from kvengine.cluster.relay import ENGINE_DEPLOYMENT
from kvengine.cluster.replica import EngineReplica, ReplicaSpec
from kvengine.cluster.routing import ROUTERS, RouterConfig
from kvengine.errors import InvalidRequestError

APP_NAME = "kvengine"


@dataclass(frozen=True)
class ClusterConfig:
    """How many replicas, where they run, and how requests are routed to them."""

    num_replicas: int = 2
    router: str = "prefix"
    router_config: RouterConfig = field(default_factory=RouterConfig)
    ray_address: str | None = None  # None: start a local Ray instance
    local_num_cpus: int | None = None  # a local instance's CPUs (None: what the replicas need, + 1)
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica
    host: str = "127.0.0.1"
    port: int = 8000
    max_ongoing_requests: int = 64  # per replica; beyond it Ray queues in the ingress
    stats_period_s: float = 1.0  # how often each replica reports what it holds

    def __post_init__(self) -> None:
        ROUTERS.lookup(self.router)  # unknown names fail with the known ones
        if self.num_replicas < 1:
            raise InvalidRequestError(f"replicas must be >= 1, got {self.num_replicas}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise InvalidRequestError("per-replica CPUs and GPUs must be >= 0")
        if not 1 <= self.port <= 65535:
            raise InvalidRequestError(f"port must be in 1..65535, got {self.port}")


class EngineDeployment(EngineReplica):
    """`EngineReplica` with Ray Serve's hooks: a health check, and closing the engine on shutdown.

    Its instance name is Ray's replica id, the name the router and /metrics use.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        super().__init__(spec)
        self.instance = serve.get_replica_context().replica_id.unique_id

    def check_health(self) -> None:
        server = self.app.state.server
        if server.llm.state == "failed":
            raise RuntimeError(f"the engine's driver stopped: {server.llm.error!r}")

    async def __del__(self) -> None:
        await self.close()


def build_app(spec: ReplicaSpec, cluster: ClusterConfig) -> Any:
    """The Serve application: `cluster.num_replicas` engine replicas behind one ingress."""
    router_kwargs = {"router": cluster.router, **cluster.router_config.__dict__}
    routing: dict[str, Any] = dict(
        request_router_class=KvengineRequestRouter,
        request_router_kwargs=router_kwargs,
        request_routing_stats_period_s=cluster.stats_period_s,
        request_routing_stats_timeout_s=max(5.0, 5 * cluster.stats_period_s),
    )
    deployment: Any = serve.deployment  # Ray's overloads do not type a class made by serve.ingress
    engine = deployment(
        EngineDeployment,
        name=ENGINE_DEPLOYMENT,
        num_replicas=cluster.num_replicas,
        max_ongoing_requests=cluster.max_ongoing_requests,
        ray_actor_options={"num_cpus": cluster.num_cpus, "num_gpus": cluster.num_gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        request_router_config=RequestRouterConfig(**routing),
    )
    ingress = deployment(
        Ingress,
        name="Ingress",
        num_replicas=1,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(engine.bind(spec), spec, APP_NAME)


def start(spec: ReplicaSpec, cluster: ClusterConfig) -> None:
    """Connect to (or start) Ray, start Serve's HTTP proxy and deploy; returns once replicas are up."""
    _init_ray(cluster)
    serve.start(http_options={"host": cluster.host, "port": cluster.port})
    serve.run(build_app(spec, cluster), name=APP_NAME, route_prefix="/")


def _init_ray(cluster: ClusterConfig, attempts: int = 3) -> None:
    """`ray.init`, joining `ray_address` or starting a local instance; a slow local start is retried.

    Ray gives a new local node 30 s to register; on a loaded machine it may
    take longer, so a start that timed out is shut down and tried again.
    """
    if cluster.ray_address:
        ray.init(address=cluster.ray_address, ignore_reinit_error=True, log_to_driver=False)
        return
    need = math.ceil(cluster.num_replicas * cluster.num_cpus) + 1
    for attempt in range(attempts):
        try:
            ray.init(
                num_cpus=cluster.local_num_cpus or need,
                num_gpus=math.ceil(cluster.num_replicas * cluster.num_gpus) or None,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=False,
            )
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts - 1:
                raise
            ray.shutdown()


def stop() -> None:
    """Delete the app, stop Serve and disconnect from Ray (a local instance ends with it)."""
    serve.shutdown()
    ray.shutdown()
