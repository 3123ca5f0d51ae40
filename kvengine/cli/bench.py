"""`kvengine bench ...`: the parsers, help texts and commands of every benchmark subcommand.

Each command only turns options into arguments for a runner in kvengine/bench, which measures
and writes the JSON rows and Markdown; nothing here measures anything itself.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kvengine.argtypes import name_list, positive_int, positive_int_list, ratio_list
from kvengine.bench.tiers import add_tiers_bench_parser
from kvengine.cli.common import CONFIG_HELP, Parser, add_config_args, config_from_args, kivi_bits
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig
from kvengine.errors import InvalidRequestError

_BENCH_HELP = """Measure prefill and decode tokens/s of kvengine and of transformers' generate
(its own dynamic cache, SDPA attention) in the same run, on the same prompts. Rows are appended
as JSON lines to --out, and a table to --report."""
_PRESSES_HELP = """For each context length, build needle-in-a-haystack examples, prefill each
context once, compress a copy of its cache with every press at every ratio, and ask for the
needle. Also runs KIVI packed caches. Writes accuracy, bytes held (fraction of the uncompressed
cache) and compression time over prefill time as JSON rows and a Markdown table."""
_THROUGHPUT_HELP = """Serve 1, 4, 16, 32 requests at once (all added together, greedy, no EOS stop)
and report output tokens/s next to transformers' generate serving requests one at a time, in the
same run. Rows are appended as JSON lines to --out, and a table to --report."""
_PREFIX_HELP = """Time to first token of a request whose --prefix-len-token prefix is in the prefix
cache, against the same request on a cold cache (fresh engine per repeat). Rows are appended as JSON
lines to --out, and a table to --report."""
_SERVE_BENCH_HELP = """Closed-loop load test: --clients clients each send a streaming request to
/v1/completions (shared-prefix, random) or /v1/chat/completions (multi-turn) as soon as their
previous one finished, until --duration-s or --max-requests ends the run. Reports request
throughput, output tokens/s, TTFT, inter-token latency and end-to-end percentiles, the prefix hit
rate and failures, as JSON rows and Markdown in --out; with /metrics on the server, also the pool's
referenced blocks before and after (a leak check). --launch starts the server itself."""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """`bench` and its subcommands: decode, presses, throughput, prefix, perplexity, tiers, serve."""
    bench = sub.add_parser("bench", help="benchmarks that write JSON rows and a Markdown report")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", parser_class=Parser)
    bench_sub.required = True
    dec = bench_sub.add_parser(
        "decode", help="prefill and decode tokens/s vs transformers' generate", description=_BENCH_HELP
    )
    dec.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    dec.add_argument("--lengths", type=positive_int_list, default=[512, 2048, 4096], help="prompt lengths")
    dec.add_argument("--new-tokens", type=positive_int, default=64, help="tokens decoded per run")
    dec.add_argument("--repeats", type=positive_int, default=3, help="runs per length and system")
    dec.add_argument("--out", default="docs/results/bench_decode.jsonl", help="JSON rows are appended here")
    dec.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")
    _add_presses_bench_parser(bench_sub)
    _add_serving_bench_parsers(bench_sub)
    _add_perplexity_parser(bench_sub)
    add_tiers_bench_parser(bench_sub)
    _add_serve_bench_parser(bench_sub)


def _add_presses_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench presses` (kvengine/bench/presses.py)."""
    pr = bench_sub.add_parser(
        "presses",
        help="needle accuracy, bytes held and compression cost per press",
        description=_PRESSES_HELP,
    )
    pr.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    pr.add_argument(
        "--lengths", type=positive_int_list, default=[2048, 4096], help="context lengths in tokens"
    )
    pr.add_argument(
        "--presses", type=name_list, default=None, help="comma-separated press specs (default: all)"
    )
    pr.add_argument("--ratios", type=ratio_list, default=[0.5, 0.75], help="compression ratios")
    pr.add_argument("--kivi", type=kivi_bits, default=[2, 4], help="KIVI bit widths to compare, or 'none'")
    pr.add_argument("--examples", type=positive_int, default=4, help="needle examples per length")
    pr.add_argument("--out", default="docs/results/bench_presses.jsonl", help="JSON rows are appended here")
    pr.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")


def _add_serving_bench_parsers(bench_sub: argparse._SubParsersAction) -> None:
    """`bench throughput` and `bench prefix` (kvengine/bench/serving.py)."""
    tp = bench_sub.add_parser(
        "throughput",
        help="output tokens/s with many requests in flight vs transformers' generate",
        description=_THROUGHPUT_HELP,
    )
    tp.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    tp.add_argument(
        "--concurrency", type=positive_int_list, default=[1, 4, 16, 32], help="requests in flight at once"
    )
    tp.add_argument("--prompt-len", type=positive_int, default=256, help="prompt tokens per request")
    tp.add_argument("--new-tokens", type=positive_int, default=64, help="output tokens per request")
    tp.add_argument(
        "--baseline-requests", type=positive_int, default=4, help="requests transformers serves one at a time"
    )
    tp.add_argument(
        "--out", default="docs/results/bench_throughput.jsonl", help="JSON rows are appended here"
    )
    tp.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")
    px = bench_sub.add_parser(
        "prefix", help="time to first token with a cached prefix vs cold", description=_PREFIX_HELP
    )
    px.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    px.add_argument("--prefix-len", type=positive_int, default=2048, help="tokens of the shared prefix")
    px.add_argument("--suffix-len", type=positive_int, default=32, help="tokens after the prefix")
    px.add_argument("--new-tokens", type=positive_int, default=8, help="output tokens per request")
    px.add_argument("--repeats", type=positive_int, default=3, help="cold/warm pairs, each on a fresh engine")
    px.add_argument("--out", default="docs/results/bench_prefix.jsonl", help="JSON rows are appended here")
    px.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")


def _add_perplexity_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench perplexity` (kvengine/bench/perplexity.py): options from `PerplexityConfig`'s fields."""
    from kvengine.bench.perplexity import PerplexityConfig

    d = PerplexityConfig()
    pp = bench_sub.add_parser(
        "perplexity",
        help="perplexity of a long text after its context is compressed, per press, ratio and KIVI width",
        description="Prefill the first LENGTH tokens of a text, compress them once (query-agnostic) with every "
        "press at every ratio, then score the next --score-len tokens teacher-forced against that cache. "
        "Appends JSON rows to OUT/perplexity.jsonl and the Markdown table to OUT/perplexity.md.",
    )
    pp.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    pp.add_argument("--lengths", type=positive_int_list, default=list(d.lengths), help="context lengths")
    pp.add_argument("--presses", type=name_list, default=list(d.presses), help="press specs, or none")
    pp.add_argument("--ratios", type=ratio_list, default=list(d.ratios), help="compression ratios")
    pp.add_argument("--kivi", type=kivi_bits, default=[], help="KIVI bit widths (with every press)")
    pp.add_argument("--score-len", type=positive_int, default=d.score_len, help="tokens scored after it")
    pp.add_argument("--text", choices=["prose", "noise"], default=d.text, help="haystack the text comes from")
    pp.add_argument("--seed", type=int, default=d.seed, help="chooses where in the text to start")
    pp.add_argument("--out", default="docs/results/perplexity", help="folder for perplexity.jsonl and .md")


def _add_serve_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench serve`: streaming clients against a server (kvengine/bench/serve_bench.py)."""
    from kvengine.bench.serve_bench import add_load_args

    bs = bench_sub.add_parser(
        "serve", help="load test of a running server: N streaming clients", description=_SERVE_BENCH_HELP
    )
    add_load_args(bs)
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


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the benchmark `args.bench` names."""
    if args.bench == "perplexity":
        _cmd_bench_perplexity(args)
        return
    if args.bench == "serve":
        _cmd_bench_serve(args)
        return
    if args.bench in ("throughput", "prefix"):
        _cmd_bench_serving(args)
        return
    if args.bench == "tiers":
        from kvengine.bench.tiers import run_tier_bench, tier_options_from_args

        options = tier_options_from_args(args)
        out, report = Path(args.out), Path(args.report)
        run_tier_bench(args.model, options, args.prefix_len, args.new_tokens, args.repeats, out, report)
        return
    if args.bench == "presses":
        from kvengine.bench.presses import DEFAULT_PRESSES, run_presses_bench

        run_presses_bench(
            args.model,
            args.lengths,
            args.presses or DEFAULT_PRESSES,
            args.ratios,
            args.kivi,
            args.examples,
            Path(args.out),
            Path(args.report),
        )
        return
    from kvengine.bench.decode import run_decode_bench

    run_decode_bench(
        args.model, args.lengths, args.new_tokens, args.repeats, Path(args.out), Path(args.report)
    )


def _cmd_bench_serving(args: argparse.Namespace) -> None:
    from kvengine.bench.serving import run_prefix_bench, run_throughput_bench

    out, report = Path(args.out), Path(args.report)
    if args.bench == "throughput":
        run_throughput_bench(
            args.model,
            args.concurrency,
            args.prompt_len,
            args.new_tokens,
            args.baseline_requests,
            out,
            report,
        )
    else:
        run_prefix_bench(
            args.model, args.prefix_len, args.suffix_len, args.new_tokens, args.repeats, out, report
        )


def _cmd_bench_serve(args: argparse.Namespace) -> None:
    from kvengine.bench.serve_bench import load_config_from_args, run_serve_bench
    from kvengine.bench.serve_launch import LaunchConfig

    if args.launch and args.url is not None:
        raise InvalidRequestError("give --url or --launch, not both")
    out = Path(args.out)
    launch = None
    if args.launch:
        flags: list[str] = []
        for config in (config_from_args(CacheConfig, args), config_from_args(SchedulerConfig, args)):
            for f in dataclasses.fields(config):  # only what differs: `serve` has the same defaults
                value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
                if value == f.default:
                    continue
                if isinstance(value, bool):
                    flags.append(flag if value else "--no-" + flag[2:])
                else:
                    flags += [flag, str(value)]
        launch = LaunchConfig(args.model, (*flags, *args.serve_arg), log_path=out / "server.log")
    report = Path(args.report) if args.report else None
    run_serve_bench(load_config_from_args(args), out, launch, report)


def _cmd_bench_perplexity(args: argparse.Namespace) -> None:
    from kvengine.bench.perplexity import PerplexityConfig, markdown, run_perplexity
    from kvengine.models import load

    cfg = PerplexityConfig(
        tuple(args.lengths), tuple(args.presses), tuple(args.ratios), tuple(args.kivi), args.score_len,
        args.text, args.seed,
    )  # fmt: skip
    out = Path(args.out)
    rows = run_perplexity(load(args.model), cfg, out / "perplexity.jsonl")
    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.md").write_text(table + "\n", encoding="utf-8")
    print(table)
