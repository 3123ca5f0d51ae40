"""`kvengine bench presses | perplexity | selection | semantic`: the accuracy benchmarks' parsers and commands.

Like `cli/bench.py`, each command only turns options into arguments for a
runner in kvengine/eval or kvengine/bench, which measures and writes the
rows and Markdown.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from kvengine.cli.argtypes import key_values, name_list, positive_int, positive_int_list, ratio_list
from kvengine.cli.common import add_model_args, add_output_args, kivi_bits, results_dir
from kvengine.config import DEFAULT_MODEL
from kvengine.models.precision import DTYPE_CHOICES

_PRESSES_HELP = """For each context length, build needle-in-a-haystack examples, prefill each
context once, compress a copy of its cache with every press at every ratio, and ask for the
needle. Also runs KIVI packed caches. Writes accuracy, bytes held (fraction of the uncompressed
cache) and compression time over prefill time as JSON rows and a Markdown table."""


def add_quality_bench_parsers(bench_sub: argparse._SubParsersAction) -> None:
    """`bench presses`, `bench perplexity`, `bench selection` and `bench semantic`."""
    _add_presses_bench_parser(bench_sub)
    _add_perplexity_parser(bench_sub)
    _add_selection_bench_parser(bench_sub)
    _add_semantic_parser(bench_sub)


def _add_selection_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench selection` (kvengine/bench/selection.py)."""
    sel = bench_sub.add_parser(
        "selection",
        help="quest block selection vs full attention: needle accuracy, blocks read, time per step",
        description="Prefill needle_hard (or --tasks) contexts; answer each with and without quest's block "
        "selection, every setting from one prefill (timing every decode step), and time one decode step's "
        "attention over every layer for each, alternating, medians. Examples already in --out are skipped.",
    )
    sel.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    sel.add_argument("--lengths", type=positive_int_list, default=[4096], help="context lengths in tokens")
    sel.add_argument("--ratio", type=float, default=0.875, help="quest's ratio: fraction of blocks not read")
    sel.add_argument(
        "--batch",
        type=positive_int_list,
        default=[1, 8],
        help="decoding copies of the context per timed attention step (comma-separated)",
    )
    sel.add_argument("--repeats", type=positive_int, default=3, help="timed attention steps per example")
    sel.add_argument(
        "--tasks",
        type=name_list,
        default=["needle_hard"],
        help="comma-separated tasks: needle_hard and the RULER-style ones (niah_single, vt, ...)",
    )
    sel.add_argument("--examples", type=positive_int, default=8, help="examples per task and length")
    sel.add_argument("--first-example", type=int, default=0, help="seed of the first example (to split runs)")
    sel.add_argument("--max-tokens", type=positive_int, default=24, help="tokens per answer")
    sel.add_argument(
        "--time-limit",
        type=float,
        default=0.0,
        help="seconds; start no example past them (0: none; rerun resumes)",
    )
    sel.add_argument(
        "--quest",
        type=key_values,
        default={},
        help="quest's hyperparameters, e.g. heads=sum,neighbours=1 (`kvengine presses` lists them)",
    )
    sel.add_argument(
        "--also",
        type=key_values,
        action="append",
        default=[],
        help="other quest hyperparameters answered too, e.g. heads=max or ratio=0.915,dense_layers=2 "
        "(ratio: this setting's own; repeatable)",
    )
    add_output_args(sel, "bench_selection.jsonl")


def _add_presses_bench_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench presses` (kvengine/eval/presses.py)."""
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
    add_output_args(pr, "bench_presses.jsonl")


def _add_perplexity_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench perplexity` (kvengine/eval/perplexity.py): options from `PerplexityConfig`'s fields."""
    from kvengine.eval.perplexity import PerplexityConfig

    d = PerplexityConfig()
    pp = bench_sub.add_parser(
        "perplexity",
        help="perplexity of a long text after its context is compressed, per press, ratio and KIVI width",
        description="Prefill the first LENGTH tokens of a text, compress them once (query-agnostic) with every "
        "press at every ratio, then score the next --score-len tokens teacher-forced against that cache. "
        "Appends JSON rows to OUT/perplexity.jsonl and the Markdown table to OUT/perplexity.md.",
    )
    add_model_args(pp)
    pp.add_argument("--lengths", type=positive_int_list, default=list(d.lengths), help="context lengths")
    pp.add_argument("--presses", type=name_list, default=list(d.presses), help="press specs, or none")
    pp.add_argument("--ratios", type=ratio_list, default=list(d.ratios), help="compression ratios")
    pp.add_argument("--kivi", type=kivi_bits, default=[], help="KIVI bit widths (with every press)")
    pp.add_argument("--kv-rotate", action="store_true", help="KIVI runs rotate keys and values first")
    pp.add_argument(
        "--kv-key-groups", choices=("channel", "token"), default="channel", help="KIVI runs' key groups"
    )
    pp.add_argument("--score-len", type=positive_int, default=d.score_len, help="tokens scored after it")
    pp.add_argument("--text", choices=["prose", "noise"], default=d.text, help="haystack the text comes from")
    pp.add_argument("--seed", type=int, default=d.seed, help="chooses where in the text to start")
    pp.add_argument(
        "--out",
        default=str(results_dir() / "perplexity"),
        help="folder for perplexity.jsonl and .md (default: %(default)s)",
    )


def _cmd_bench_presses(args: argparse.Namespace) -> None:
    from kvengine.eval.presses import DEFAULT_PRESSES, run_presses_bench

    run_presses_bench(
        args.model,
        args.lengths,
        args.presses or DEFAULT_PRESSES,
        args.ratios,
        args.kivi,
        args.examples,
        Path(args.out),
        Path(args.report),
        command=args.command_line,
    )


def _cmd_bench_selection(args: argparse.Namespace) -> None:
    from kvengine.bench.selection import run_selection_bench

    run_selection_bench(
        args.model, args.lengths, args.ratio, args.batch, args.repeats,
        Path(args.out), Path(args.report), tasks=args.tasks, examples=args.examples,
        first_example=args.first_example, max_tokens=args.max_tokens,
        quest=args.quest, also=args.also, time_limit_s=args.time_limit, command=args.command_line,
    )  # fmt: skip


def _cmd_bench_perplexity(args: argparse.Namespace) -> None:
    from kvengine.eval.perplexity import PerplexityConfig, markdown, run_perplexity
    from kvengine.models import load

    cfg = PerplexityConfig(
        tuple(args.lengths), tuple(args.presses), tuple(args.ratios), tuple(args.kivi), args.score_len,
        args.text, args.seed, args.kv_rotate, args.kv_key_groups,
    )  # fmt: skip
    out = Path(args.out)
    rows = run_perplexity(
        load(args.model, dtype=args.dtype, device=args.device, weights=args.weights),
        cfg,
        out / "perplexity.jsonl",
    )
    table = markdown(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "perplexity.md").write_text(table + "\n", encoding="utf-8")
    print(table)


_SEMANTIC_HELP = """Replay streams of generated prompts (paraphrases and near misses with known answers) through
the semantic cache at each error bound and threshold policy, per embedder; report hit rate, the error
rate among hits with its 95% interval, and pair similarities. Appends JSON rows to --out and a section
to --report."""


def _bound_list(text: str) -> list[float]:
    """Comma-separated error bounds, each strictly between 0 and 1."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"error bounds must be in (0, 1), got {text!r}")
    return values


def _add_semantic_parser(bench_sub: argparse._SubParsersAction) -> None:
    """`bench semantic` (kvengine/bench/semantic.py)."""
    from kvengine.bench.semantic import SemanticBench

    d = SemanticBench()
    p: argparse.ArgumentParser = bench_sub.add_parser(
        "semantic",
        help="semantic response cache: hit rate and error at error bounds",
        description=_SEMANTIC_HELP,
    )
    p.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto", help="weights precision (as elsewhere)")
    p.add_argument("--embedders", type=name_list, default=list(d.embedders), help="embedder names")
    p.add_argument("--policies", type=name_list, default=list(d.policies), help="threshold policies")
    p.add_argument("--bounds", type=_bound_list, default=list(d.bounds), help="maximum error rates")
    p.add_argument("--pairs", type=positive_int, default=d.num_pairs, help="labelled pairs")
    p.add_argument("--prompts", type=positive_int, default=d.num_prompts, help="prompts per stream")
    p.add_argument("--keys", type=positive_int, default=d.num_keys, help="distinct answers per stream")
    p.add_argument("--streams", type=positive_int, default=len(d.seeds), help="streams (seeds 0..N-1)")
    p.add_argument(
        "--explore-rate", type=float, default=d.explore_rate, help="chance a would-be hit is checked"
    )
    add_output_args(p, "bench_semantic.jsonl")


def _cmd_bench_semantic(args: argparse.Namespace) -> None:
    """Run `bench semantic`; unknown embedder or policy names fail before any model is loaded."""
    from kvengine.bench.semantic import SemanticBench, run_semantic_bench
    from kvengine.semantic.embedder import EMBEDDERS
    from kvengine.semantic.thresholds import THRESHOLD_POLICIES

    for name in args.embedders:
        EMBEDDERS.lookup(name)
    for name in args.policies:
        THRESHOLD_POLICIES.lookup(name)
    spec = SemanticBench(
        tuple(args.embedders),
        tuple(args.policies),
        tuple(args.bounds),
        args.pairs,
        args.prompts,
        args.keys,
        tuple(range(args.streams)),
        explore_rate=args.explore_rate,
    )
    run_semantic_bench(args.model, spec, Path(args.out), Path(args.report), args.command_line, args.dtype)


QUALITY_BENCHES: dict[str, Callable[[argparse.Namespace], None]] = {
    "presses": _cmd_bench_presses,
    "perplexity": _cmd_bench_perplexity,
    "selection": _cmd_bench_selection,
    "semantic": _cmd_bench_semantic,
}
