"""`kvengine simulate`: the parser and command of the trace replay (kvengine/sim/replay.py).

The replay and the trace formats live in kvengine/sim; this module turns options into a trace
(loaded, or generated and saved) and prints and appends what `run_simulation` returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvengine.cache.policy import POLICIES
from kvengine.cli.argtypes import positive_int, positive_int_list
from kvengine.cluster.routing import ROUTERS
from kvengine.errors import InvalidRequestError

_HELP = """Replay a request trace through kvengine's radix prefix cache, without a model, and
print token and block hit rates and evictions for each eviction policy and cache capacity.
The trace is Mooncake's JSONL format (timestamp, input_length, output_length, hash_ids: one id
per 512-token block). Requests are served one at a time in timestamp order; each looks up its
blocks, then inserts them. "belady" is the offline optimum (Belady's MIN; it reads the future):
the bound no policy can beat. With --generate, a synthetic trace (shared system prompts,
Zipf-popular documents, multi-turn chats) is written to FILE first and replayed.
With --replicas N, the trace is routed over N replicas, each with its own cache of each
capacity, by each --router (prefix: cache-aware, as `kvengine cluster`; round_robin; least_load),
and the table gives hit rates and routing decisions per router instead."""


def _policies(text: str) -> list[str]:
    names = list(POLICIES) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in POLICIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown policy {', '.join(unknown) or repr(text)}; known: {', '.join(POLICIES)}, all"
        )
    return names


def _routers(text: str) -> list[str]:
    names = list(ROUTERS) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in ROUTERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown router {', '.join(unknown) or repr(text)}; known: {', '.join(ROUTERS)}, all"
        )
    return names


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    """Add `kvengine simulate` to the CLI's subcommands (handled by `run_simulate_command`)."""
    sim = sub.add_parser(
        "simulate", help="replay a trace through the prefix cache (no model)", description=_HELP
    )
    source = sim.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", help="Mooncake-format JSONL trace to replay")
    source.add_argument("--generate", metavar="FILE", help="write a synthetic trace to FILE and replay it")
    sim.add_argument(
        "--capacity-blocks",
        type=positive_int_list,
        default=[2000, 8000, 16000],
        metavar="N[,N...]",
        help="cache sizes in blocks, comma-separated (default: 2000,8000,16000)",
    )
    sim.add_argument(
        "--policy",
        type=_policies,
        default=["lru"],
        metavar="NAME[,NAME...]",
        help=f"eviction policies, comma-separated, or 'all' ({', '.join(POLICIES)}; default: lru)",
    )
    sim.add_argument(
        "--replicas",
        type=positive_int,
        default=None,
        metavar="N",
        help="route the trace over N replicas (LRU caches of each capacity) instead of one cache",
    )
    sim.add_argument(
        "--router",
        type=_routers,
        default=None,
        metavar="NAME[,NAME...]",
        help=f"routers with --replicas, comma-separated, or 'all' ({', '.join(ROUTERS)}; default: all)",
    )
    sim.add_argument("--out", default=None, metavar="FILE", help="append JSON rows to FILE")
    gen = sim.add_argument_group("synthetic trace (with --generate)")
    gen.add_argument("--num-requests", type=positive_int, default=2000, help="requests (default: 2000)")
    gen.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")


def run_simulate_command(args: argparse.Namespace) -> None:
    """`kvengine simulate`: replay, print a Markdown table, append JSON rows to --out."""
    from kvengine.results import append_rows
    from kvengine.sim.replay import result_rows, results_table, run_simulation, serving_order, unbounded_hits
    from kvengine.sim.trace import SyntheticTraceConfig, generate_trace, load_trace, save_trace

    if args.generate:
        config = SyntheticTraceConfig(num_requests=args.num_requests, seed=args.seed)
        requests, trace = generate_trace(config), args.generate
        save_trace(trace, requests)
    else:
        requests, trace = load_trace(args.trace), args.trace
    requests = serving_order(requests)
    ceiling = unbounded_hits(requests)
    print(
        f"{trace}: {len(requests)} requests, {ceiling.input_blocks} blocks, "
        f"{ceiling.capacity_blocks} distinct; a cache that never evicts hits "
        f"{ceiling.token_hit_rate:.4f} of tokens, {ceiling.block_hit_rate:.4f} of blocks"
    )
    if args.replicas is not None or args.router is not None:
        _run_routed(args, requests, trace)
        return
    results = run_simulation(requests, args.capacity_blocks, args.policy, progress=True)
    print(results_table(results))
    if args.out:
        append_rows(Path(args.out), result_rows([*results, ceiling], trace))


def _run_routed(args: argparse.Namespace, requests: list, trace: str) -> None:
    """`--replicas`: one routed replay per (capacity, router); the --policy option does not apply."""
    from kvengine.results import append_rows
    from kvengine.sim.routing import replay_routed, routed_rows, routed_table

    if args.policy != ["lru"]:
        raise InvalidRequestError("--policy applies to one cache; with --replicas each replica is LRU")
    num_replicas = args.replicas or 4
    routers = args.router or list(ROUTERS)
    results = [
        replay_routed(requests, num_replicas, capacity, router)
        for capacity in args.capacity_blocks
        for router in routers
    ]
    print(routed_table(results))
    if args.out:
        append_rows(Path(args.out), routed_rows(results, trace))
