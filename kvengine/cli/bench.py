"""`kvengine bench ...`: the parsers, help texts and commands of every benchmark subcommand.

Each command only turns options into arguments for a runner in kvengine/bench or kvengine/eval,
which measures and writes the JSON rows and Markdown; nothing here measures anything itself.
Rows and reports go to `results_dir()` unless --out / --report say otherwise, and the command
line recorded in a report is the one this process was given. `bench serve` is in `bench_serve`;
the accuracy benchmarks (presses, perplexity, selection) are in `bench_quality`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from kvengine.bench.rag import add_rag_parser, cmd_bench_rag
from kvengine.cli.argtypes import positive_int, positive_int_list
from kvengine.cli.bench_quality import QUALITY_BENCHES, add_quality_bench_parsers
from kvengine.cli.bench_serve import add_serve_bench_parser, cmd_bench_serve
from kvengine.cli.common import Parser, add_device_arg, add_output_args
from kvengine.config import DEFAULT_MODEL

if TYPE_CHECKING:
    from kvengine.bench.llamacpp import LlamaCppBaseline

_BENCH_HELP = """Measure prefill and decode tokens/s of kvengine and of transformers' generate
(its own dynamic cache, SDPA attention) in the same run, on the same prompts; with --baseline
llamacpp, also llama.cpp on the same GGUF weights at --llamacpp-precision, its tokens compared with
kvengine's. Rows are appended as JSON lines to --out, and a table to --report."""
_THROUGHPUT_HELP = """Serve 1, 4, 16, 32 requests at once (all added together, greedy, no EOS stop)
and report output tokens/s next to transformers' generate serving requests one at a time, in the
same run; with --baseline llamacpp, also llama.cpp serving the same prompts as parallel sequences.
Rows are appended as JSON lines to --out, and a table to --report."""
_PREFIX_HELP = """Time to first token of a request whose --prefix-len-token prefix is in the prefix
cache, against the same request on a cold cache (fresh engine per repeat). Rows are appended as JSON
lines to --out, and a table to --report."""
_TIERS_HELP = """Each repeat runs two fresh processes, one after the other, over the same storage
tier (Redis or a disk directory) and the same prompt (a --prefix-len-token document and a short
question), each in a new engine: process A finds nothing cached, prefills the whole prompt and writes
the prefix's blocks through to the tier (the cold baseline); process B, started after A has exited,
loads those blocks from the tier instead of computing them. Reports both times to first token (model
loading excluded), their ratio, the tokens B reused and whether B's output equals A's."""


def _add_llamacpp_args(parser: argparse.ArgumentParser) -> None:
    """`--baseline llamacpp` and its options (kvengine/bench/llamacpp.py)."""
    parser.add_argument(
        "--baseline",
        choices=["llamacpp"],
        default=None,
        help="also run llama.cpp (its own venv; tools/llamacpp_reference/README.md) on the same weights",
    )
    parser.add_argument(
        "--llamacpp-python",
        default=None,
        help="python of the llama.cpp venv (default: .venv-llamacpp/bin/python here or in the source checkout)",
    )
    parser.add_argument(
        "--llamacpp-precision",
        choices=["f32", "bf16", "q8_0", "q4_1"],
        default="f32",
        help="weights and KV cache of llama.cpp; kvengine and transformers load the model in the same dtype "
        "(q8_0 / q4_1: int8 / 4-bit weights in groups of 32 with an f32 KV cache, matched by kvengine's "
        "--weights int8 / int4)",
    )
    parser.add_argument(
        "--llamacpp-threads", type=positive_int, default=None, help="llama.cpp threads (default: torch's)"
    )


def _llamacpp_baseline(args: argparse.Namespace) -> LlamaCppBaseline | None:
    """The llama.cpp baseline the options ask for, or None without `--baseline llamacpp`."""
    if args.baseline != "llamacpp":
        return None
    from kvengine.bench.llamacpp import LlamaCppBaseline, default_python

    python = Path(args.llamacpp_python).expanduser() if args.llamacpp_python else default_python()
    return LlamaCppBaseline(python, args.llamacpp_precision, args.llamacpp_threads or 0)


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
    add_device_arg(dec)
    _add_llamacpp_args(dec)
    add_output_args(dec, "bench_decode.jsonl")
    _add_serving_bench_parsers(bench_sub)
    _add_tiers_bench_parser(bench_sub)
    add_serve_bench_parser(bench_sub)
    add_quality_bench_parsers(bench_sub)
    add_output_args(add_rag_parser(bench_sub), "bench_rag.jsonl")
    _add_detokenize_parser(bench_sub)


def _add_detokenize_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench detokenize`: streaming's detokenization cost per token along a long output."""
    p = bench_sub.add_parser(
        "detokenize",
        help="streaming detokenization cost per token along a long output",
        description="""Stream a --tokens-long output (prose through the model's tokenizer) token by
token through kvengine's incremental TextStream and through a naive stream that decodes the whole
output at every token, alternating; report the median microseconds per token at several positions.
Only the tokenizer's model is loaded; no forward pass runs.""",
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    p.add_argument("--tokens", type=positive_int, default=4096, help="output length (at least 128)")
    p.add_argument("--repeats", type=positive_int, default=3, help="passes per stream")
    add_output_args(p, "bench_detokenize.jsonl")


def _cmd_bench_detokenize(args: argparse.Namespace) -> None:
    from kvengine.bench import detokenize
    from kvengine.models import load
    from kvengine.results import append_report, append_rows

    if args.tokens < 2 * detokenize.WINDOW:
        raise SystemExit(f"--tokens must be at least {2 * detokenize.WINDOW}")
    rows = detokenize.run(load(args.model).tokenizer, args.tokens, args.repeats)
    append_rows(Path(args.out), rows)
    table = detokenize.table(rows)
    append_report(
        Path(args.report), f"Streaming detokenization, {args.tokens}-token output", args.command_line, table
    )
    print(table)


def _add_serving_bench_parsers(bench_sub: argparse._SubParsersAction) -> None:
    """`bench throughput` and `bench prefix` (kvengine/bench/throughput.py)."""
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
    _add_llamacpp_args(tp)
    add_output_args(tp, "bench_throughput.jsonl")
    px = bench_sub.add_parser(
        "prefix", help="time to first token with a cached prefix vs cold", description=_PREFIX_HELP
    )
    px.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    px.add_argument("--prefix-len", type=positive_int, default=2048, help="tokens of the shared prefix")
    px.add_argument("--suffix-len", type=positive_int, default=32, help="tokens after the prefix")
    px.add_argument("--new-tokens", type=positive_int, default=8, help="output tokens per request")
    px.add_argument("--repeats", type=positive_int, default=3, help="cold/warm pairs, each on a fresh engine")
    add_output_args(px, "bench_prefix.jsonl")


def _add_tiers_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench tiers` (kvengine/bench/tiers.py), and the hidden `--child` each of its processes runs."""
    p = bench_sub.add_parser(
        "tiers",
        help="TTFT of a prefix computed by one process and loaded from a tier by the next",
        description=_TIERS_HELP,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    p.add_argument("--tier", choices=["redis", "disk"], default="redis", help="the shared tier")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for --tier redis")
    p.add_argument("--disk-dir", default="", help="directory for --tier disk (default: a new temp dir)")
    p.add_argument("--prefix-len", type=positive_int, default=2048, help="tokens of the shared document")
    p.add_argument("--new-tokens", type=positive_int, default=8, help="output tokens per request")
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="pairs of processes (each on a new document)"
    )
    add_output_args(p, "bench_tiers.jsonl")
    # One process of the benchmark (kvengine.bench.tiers.spawn_child starts it): prints one JSON line.
    p.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)


def _tier_options(args: argparse.Namespace) -> dict[str, str]:
    """The `CacheConfig` fields of the tier `--tier` names (a new temp dir for disk without --disk-dir)."""
    if args.tier == "redis":
        return {"tiers": "redis", "redis_url": args.redis_url}
    directory = args.disk_dir
    if not directory:
        import tempfile

        directory = tempfile.mkdtemp(prefix="kvengine-bench-tiers-")
    return {"tiers": "disk", "disk_tier_dir": directory}


def _cmd_bench_tiers(args: argparse.Namespace) -> None:
    from kvengine.bench.tiers import run_child, run_tier_bench

    if args.child is not None:
        model_name, options, prefix_len, seed, new_tokens = args.child
        result = run_child(model_name, json.loads(options), int(prefix_len), int(seed), int(new_tokens))
        print(json.dumps(result))
        return
    out, report = Path(args.out), Path(args.report)
    run_tier_bench(
        args.model, _tier_options(args), args.prefix_len, args.new_tokens, args.repeats, out, report,
        command=args.command_line,
    )  # fmt: skip


def _cmd_bench_decode(args: argparse.Namespace) -> None:
    from kvengine.bench.decode import run_decode_bench

    out, report = Path(args.out), Path(args.report)
    run_decode_bench(
        args.model, args.lengths, args.new_tokens, args.repeats, out, report,
        command=args.command_line, llamacpp=_llamacpp_baseline(args), device=args.device,
    )  # fmt: skip


def _cmd_bench_throughput(args: argparse.Namespace) -> None:
    from kvengine.bench.throughput import run_throughput_bench

    run_throughput_bench(
        args.model, args.concurrency, args.prompt_len, args.new_tokens, args.baseline_requests,
        Path(args.out), Path(args.report), command=args.command_line, llamacpp=_llamacpp_baseline(args),
    )  # fmt: skip


def _cmd_bench_prefix(args: argparse.Namespace) -> None:
    from kvengine.bench.throughput import run_prefix_bench

    run_prefix_bench(
        args.model, args.prefix_len, args.suffix_len, args.new_tokens, args.repeats,
        Path(args.out), Path(args.report), command=args.command_line,
    )  # fmt: skip


_BENCHES = {
    **QUALITY_BENCHES,
    "decode": _cmd_bench_decode,
    "throughput": _cmd_bench_throughput,
    "prefix": _cmd_bench_prefix,
    "tiers": _cmd_bench_tiers,
    "serve": cmd_bench_serve,
    "rag": cmd_bench_rag,
    "detokenize": _cmd_bench_detokenize,
}


def cmd_bench(args: argparse.Namespace) -> None:
    """Run the benchmark `args.bench` names (`args.command_line` is recorded in its report)."""
    _BENCHES[args.bench](args)
