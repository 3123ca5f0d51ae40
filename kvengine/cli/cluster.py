"""`kvengine cluster`: its parser and command, which run N engine replicas on Ray Serve behind one endpoint.

The cluster itself lives in kvengine/cluster; this module turns options into a
`ReplicaSpec` (what each replica serves: the same settings as `kvengine serve`)
and a `ClusterConfig` (replicas, router, Ray), starts it and waits for Ctrl-C.
"""

from __future__ import annotations

import argparse

from kvengine.cli.argtypes import positive_float, positive_int
from kvengine.cli.common import CONFIG_HELP, add_config_args, add_model_args, config_from_args
from kvengine.cli.serve import _LIMITS, model_of
from kvengine.cluster.routing import ROUTERS, RouterConfig
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig, ServerConfig

_HELP = """Serve MODEL from N kvengine engine replicas on Ray Serve behind one OpenAI-compatible
endpoint: the routes, API keys and limits of `kvengine serve`, each replica running that server's
app. Starts a local Ray instance (no dashboard), or joins one with --ray-address. Requests go to
the replica holding the longest cached prefix of the same tenant's prompt, unless it is
overloaded (--router prefix, the default), or by round_robin / least_load. With
--prefix-cache --tiers redis --redis-url URL, all replicas share one Redis tier. GET /metrics gives
routing decisions and per-replica and total requests and prefix-cache hits. Ctrl-C stops it."""


def add_cluster_parser(sub: argparse._SubParsersAction) -> None:
    """`cluster`: N replicas on Ray Serve (kvengine/cluster)."""
    defaults, routing = ServerConfig(), RouterConfig()
    cl = sub.add_parser("cluster", help="serve a model from N replicas on Ray Serve", description=_HELP)
    cl.add_argument("model_arg", nargs="?", metavar="MODEL", default=None, help=f"default: {DEFAULT_MODEL}")
    add_model_args(cl)
    cl.set_defaults(model=None)
    cl.add_argument("--served-model-name", default=None, metavar="NAME", help="the name clients call it by")
    cl.add_argument("--replicas", type=positive_int, default=2, help="engine replicas (default: 2)")
    cl.add_argument(
        "--router",
        choices=list(ROUTERS),
        default="prefix",
        help="prefix: cache-aware, with load fallback; round_robin; least_load (default: prefix)",
    )
    cl.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. ray://HOST:10001, auto)")
    cl.add_argument("--local-num-cpus", type=positive_int, default=None, help="CPUs of a local Ray instance")
    cl.add_argument(
        "--num-cpus-per-replica", type=float, default=1.0, help="Ray CPUs per replica (default: 1)"
    )
    cl.add_argument(
        "--num-gpus-per-replica", type=float, default=0.0, help="Ray GPUs per replica (default: 0)"
    )
    cl.add_argument("--chunk-chars", type=positive_int, default=64, help="characters per routing block")
    cl.add_argument(
        "--min-match", type=float, default=routing.min_match, help="share of blocks to count as a match"
    )
    cl.add_argument(
        "--balance-abs", type=int, default=routing.balance_abs, help="overload: requests above least"
    )
    cl.add_argument(
        "--balance-rel", type=float, default=routing.balance_rel, help="overload: factor above least"
    )
    cl.add_argument(
        "--stats-period-s", type=positive_float, default=1.0, help="seconds between replica reports"
    )
    cl.add_argument("--host", default=defaults.host, help=f"address to listen on (default: {defaults.host})")
    cl.add_argument("--port", type=int, default=defaults.port, help=f"port (default: {defaults.port})")
    cl.add_argument("--api-key", action="append", default=[], help="accepted Bearer key (repeatable)")
    cl.add_argument("--public-prefix", action="append", default=[], metavar="TEXT", help="as in serve")
    for name, (kind, text) in _LIMITS.items():
        cl.add_argument("--" + name.replace("_", "-"), type=kind, default=getattr(defaults, name), help=text)
    add_config_args(cl, CacheConfig, CONFIG_HELP)
    add_config_args(cl, SchedulerConfig, CONFIG_HELP)


def specs_from_args(args: argparse.Namespace) -> tuple:
    """The `ReplicaSpec` and `ClusterConfig` the options describe (InvalidRequestError if they are bad)."""
    from kvengine.cluster.replica import ReplicaSpec

    server = ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        public_prefixes=tuple(args.public_prefix),
        **{name: getattr(args, name) for name in _LIMITS},
    )
    spec = ReplicaSpec(
        model=model_of(args),
        dtype=args.dtype,
        device=args.device,
        weights=args.weights,
        served_model_name=args.served_model_name,
        server=server,
        cache=config_from_args(CacheConfig, args),
        scheduler=config_from_args(SchedulerConfig, args),
        chunk_chars=args.chunk_chars,
    )
    routing = RouterConfig(
        min_match=args.min_match, balance_abs=args.balance_abs, balance_rel=args.balance_rel
    )
    return spec, _cluster_config(args, routing)


def _cluster_config(args: argparse.Namespace, routing: RouterConfig) -> object:
    from kvengine.cluster.launch import ClusterConfig

    return ClusterConfig(
        num_replicas=args.replicas,
        router=args.router,
        router_config=routing,
        ray_address=args.ray_address,
        local_num_cpus=args.local_num_cpus,
        num_cpus=args.num_cpus_per_replica,
        num_gpus=args.num_gpus_per_replica,
        host=args.host,
        port=args.port,
        stats_period_s=args.stats_period_s,
    )


def cmd_cluster(args: argparse.Namespace) -> None:
    """Start the cluster and serve until Ctrl-C."""
    import time

    from kvengine.errors import InvalidRequestError

    try:
        from kvengine.cluster import launch
    except ImportError as exc:
        raise InvalidRequestError(
            f"`kvengine cluster` needs Ray Serve: pip install 'kvengine[cluster]' ({exc})"
        ) from None
    spec, cluster = specs_from_args(args)
    launch.start(spec, cluster)  # type: ignore[arg-type]
    print(
        f"kvengine cluster: {args.replicas} replicas of {spec.model}, router {args.router}, "
        f"at http://{args.host}:{args.port}/v1",
        flush=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        launch.stop()
