"""`kvengine bench serve`: the load test's parser and command.

Options map one to one onto `LoadConfig` (the load) and `LaunchConfig` (the
server `--launch` starts); the load test itself is in kvengine/bench/serving.
This module measures nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kvengine.bench.serving.workloads import WORKLOADS, LoadConfig
from kvengine.cli.argtypes import int_range, positive_float, positive_int
from kvengine.cli.common import CONFIG_HELP, add_config_args, config_from_args, results_dir
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig
from kvengine.errors import InvalidRequestError

_SERVE_BENCH_HELP = """Closed-loop load test: --clients clients each send a streaming request to
/v1/completions (shared-prefix, random) or /v1/chat/completions (multi-turn) as soon as their
previous one finished, until --duration-s or --max-requests ends the run. Reports request
throughput, output tokens/s, TTFT, inter-token latency and end-to-end percentiles, the prefix hit
rate and failures, as JSON rows and Markdown in --out; with /metrics on the server, also the pool's
referenced blocks before and after (a leak check). --launch starts the server itself."""


def add_serve_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench serve`: streaming clients against a server (kvengine/bench/serving/bench.py)."""
    bs = bench_sub.add_parser(
        "serve", help="load test of a running server: N streaming clients", description=_SERVE_BENCH_HELP
    )
    _add_load_args(bs)
    launch = bs.add_argument_group("--launch: the server to start (the options below apply only with it)")
    launch.add_argument(
        "--launch", action="store_true", help="start `kvengine serve` on a free loopback port"
    )
    launch.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    launch.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="another `kvengine serve` flag (repeatable), e.g. --serve-arg=--max-concurrent-requests=64",
    )
    add_config_args(bs, CacheConfig, CONFIG_HELP)
    add_config_args(bs, SchedulerConfig, CONFIG_HELP)


def _add_load_args(parser: argparse.ArgumentParser) -> None:
    """The load generator's options, one per `LoadConfig` field, and where results go."""
    d = LoadConfig()
    parser.add_argument("--url", default=None, help=f"server to load (default: {d.url}); not with --launch")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="sent as Authorization: Bearer KEY; repeatable: with K keys, client i sends key i mod K "
        "and each key is one tenant (results name it by index, never by key); shared-prefix then "
        "gives each prefix to two tenants, so a hit across tenants would show",
    )
    parser.add_argument(
        "--clients", type=positive_int, default=d.num_clients, help="concurrent closed-loop clients"
    )
    parser.add_argument(
        "--duration-s", type=positive_float, default=d.duration_s, help="no request starts after this"
    )
    parser.add_argument(
        "--max-requests", type=positive_int, default=None, help="stop after this many requests"
    )
    parser.add_argument(
        "--workload", choices=list(WORKLOADS), default=d.workload, help="what the clients send"
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the prompts")
    for name, text in (
        ("prompt_len_range", "prompt words (suffix for shared-prefix, user message for multi-turn)"),
        ("max_tokens_range", "max_tokens per request"),
    ):
        low, high = getattr(d, name)
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int_range,
            default=(low, high),
            metavar="LOW,HIGH",
            help=f"{text} (default: {low},{high})",
        )
    parser.add_argument(
        "--shared-prefix-len",
        type=positive_int,
        default=d.shared_prefix_len,
        help="words in each shared prefix",
    )
    parser.add_argument(
        "--num-groups", type=positive_int, default=d.num_groups, help="distinct shared prefixes"
    )
    parser.add_argument(
        "--turns", type=positive_int, default=d.turns, help="user turns per multi-turn conversation"
    )
    parser.add_argument(
        "--request-timeout-s",
        type=positive_float,
        default=d.request_timeout_s,
        help="longest a request may take",
    )
    _add_output_args(parser)


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    """Where the rows and the Markdown go."""
    parser.add_argument(
        "--out",
        default=str(results_dir() / "bench_serve"),
        help="folder for bench_serve.jsonl, bench_serve_requests.jsonl (one row per request) and "
        "bench_serve.md (default: %(default)s)",
    )
    parser.add_argument("--report", default=None, help="Markdown report to append a section to")


def _load_config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        url=args.url or LoadConfig().url,
        api_keys=tuple(args.api_key),
        num_clients=args.clients,
        duration_s=args.duration_s,
        max_requests=args.max_requests,
        workload=args.workload,
        seed=args.seed,
        prompt_len_range=args.prompt_len_range,
        max_tokens_range=args.max_tokens_range,
        shared_prefix_len=args.shared_prefix_len,
        num_groups=args.num_groups,
        turns=args.turns,
        request_timeout_s=args.request_timeout_s,
    )


def _serve_flags(args: argparse.Namespace) -> list[str]:
    """The cache and scheduler options as `kvengine serve` flags, only those off their defaults
    (`serve` has the same defaults)."""
    flags: list[str] = []
    for config in (config_from_args(CacheConfig, args), config_from_args(SchedulerConfig, args)):
        for f in dataclasses.fields(config):
            value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
            if value == f.default:
                continue
            if isinstance(value, bool):
                flags.append(flag if value else "--no-" + flag[2:])
            else:
                flags += [flag, str(value)]
    return flags


def cmd_bench_serve(args: argparse.Namespace) -> None:
    """Run `kvengine bench serve` with the parsed arguments."""
    from kvengine.bench.serving.bench import run_serve_bench
    from kvengine.bench.serving.launch import LaunchConfig

    if args.launch and args.url is not None:
        raise InvalidRequestError("give --url or --launch, not both")
    out = Path(args.out)
    launch = None
    if args.launch:
        launch = LaunchConfig(args.model, (*_serve_flags(args), *args.serve_arg), log_path=out / "server.log")
    report = Path(args.report) if args.report else None
    run_serve_bench(_load_config(args), out, launch, report, command=args.command_line)
