"""`kvengine eval` and `kvengine report`: options to `EvalConfig` and `run_eval`, rows to a report.

The logic is in kvengine/eval (`runner` measures, `report` renders); this module only parses.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kvengine.cli.argtypes import name_list, positive_int, positive_int_list, ratio_list
from kvengine.cli.common import add_model_args, results_dir
from kvengine.errors import InvalidRequestError
from kvengine.eval.kvpress_client import BASELINES, RECIPE

_EVAL_HELP = """Prefill each example's context once, compress a copy with every press at every ratio, ask
all its questions of that copy, and append one JSON row per (engine, model, seed, task, length,
example, depth, press, ratio, kivi) to --out. Example i of N puts its needle at depth (i + 0.5) / N,
so --examples 5 makes a needle grid over 5 depths. With --baseline kvpress the presses kvpress also
has answer the same token ids through kvpress's pipeline too. Rows already in --out are skipped, so a
stopped run resumes. `kvengine report OUT` renders the table and plots."""


def _kivi_list(text: str) -> list[int]:
    return [] if text.strip() == "none" else positive_int_list(text)


def ratio_budget_list(text: str) -> list[float]:
    """Comma-separated byte budgets, each a fraction of the 16-bit cache in (0, 1]."""
    try:
        budgets = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not budgets or not all(0.0 < b <= 1.0 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets are fractions of the 16-bit cache in (0, 1], got {text!r}")
    return budgets


def _add_budget_args(ev: argparse.ArgumentParser) -> None:
    """--kv-budgets and --packed-presses: settings at the same bytes on different storage."""
    ev.add_argument(
        "--kv-budgets",
        type=ratio_budget_list,
        default=[],
        metavar="FRACTIONS",
        help="byte budgets as fractions of the 16-bit cache (e.g. 0.25,0.125), instead of --ratios: "
        "each setting runs at the ratio that holds the budget on its storage",
    )
    ev.add_argument(
        "--packed-presses",
        type=name_list,
        default=[],
        help="presses (or duo) that also run on each --kivi width: evict, then pack what they keep",
    )


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """`kvengine eval --tasks ruler --lengths 1024,2048 --presses none,snapkv --ratios 0.25,0.5 [--kivi 2]`."""
    ev = sub.add_parser(
        "eval",
        help="task accuracy, KV bytes and time per press (RULER-style tasks or your JSONL)",
        description=_EVAL_HELP,
    )
    add_model_args(ev)
    ev.add_argument(
        "--tasks",
        type=name_list,
        default=["ruler"],
        help="task names, 'ruler' (all) or paths of .jsonl task files",
    )
    ev.add_argument(
        "--lengths", type=positive_int_list, default=[1024, 2048], help="context lengths in tokens"
    )
    ev.add_argument(
        "--presses", type=name_list, default=["none", "snapkv", "knorm"], help="press specs, or none"
    )
    ev.add_argument("--ratios", type=ratio_list, default=[0.25, 0.5], help="compression ratios")
    ev.add_argument(
        "--kivi", type=_kivi_list, default=[], help="KIVI bit widths (2, 3, 4, 8) to run, or none"
    )
    ev.add_argument(
        "--kv-rotate",
        action="store_true",
        help="KIVI runs rotate keys and values (randomized Hadamard) before packing them",
    )
    ev.add_argument(
        "--kv-key-groups",
        choices=("channel", "token"),
        default="channel",
        help="KIVI runs quantize keys per channel (KIVI, default) or per token",
    )
    _add_budget_args(ev)
    ev.add_argument("--examples", type=positive_int, default=2, help="examples per task and length")
    ev.add_argument("--seed", type=int, default=0, help="seed of the generated examples")
    ev.add_argument("--max-tokens", type=positive_int, default=32, help="answer tokens at most")
    ev.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    ev.add_argument(
        "--out",
        default=str(results_dir() / "eval.jsonl"),
        help="JSON rows are appended here (default: %(default)s)",
    )
    ev.add_argument(
        "--baseline",
        choices=BASELINES,
        default=None,
        help="also run the presses kvpress has through kvpress's own pipeline, on the same token ids "
        "(rows with engine 'kvpress'); needs --kvpress-python",
    )
    ev.add_argument(
        "--kvpress-python",
        type=Path,
        default=None,
        help=f"python of a venv with kvpress, for --baseline kvpress ({RECIPE})",
    )


def run_eval_command(args: argparse.Namespace) -> None:
    """Run `kvengine eval` with the parsed arguments."""
    from kvengine.eval.runner import EvalConfig, run_eval
    from kvengine.models import load

    if args.baseline is not None and args.kvpress_python is None:
        raise InvalidRequestError(
            f"--baseline {args.baseline} needs --kvpress-python PATH, the python of a venv with kvpress; {RECIPE}"
        )
    cfg = EvalConfig(
        tuple(args.tasks),
        tuple(args.lengths),
        tuple(args.presses),
        tuple(args.ratios),
        tuple(args.kivi),
        args.examples,
        args.seed,
        args.max_tokens,
        False if args.no_chat else None,
        args.baseline,
        args.kvpress_python,
        kv_rotate=args.kv_rotate,
        kv_key_groups=args.kv_key_groups,
        budgets=tuple(args.kv_budgets),
        packed_presses=tuple(args.packed_presses),
    )
    rows = run_eval(
        load(args.model, dtype=args.dtype, device=args.device, weights=args.weights), cfg, Path(args.out)
    )
    print(f"{len(rows)} rows appended to {args.out}; `kvengine report {args.out}` renders them")


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`kvengine report RESULTS.jsonl [--out-dir DIR]`."""
    rep = sub.add_parser(
        "report",
        help="Markdown table and PNG plots from `kvengine eval` results",
        description="Regenerate the table (task x press x ratio: accuracy, KV bytes held, time) and the plots "
        "(accuracy vs KV bytes per press; needle grid heatmap when present) from eval's JSON rows.",
    )
    rep.add_argument("results", help="JSONL file written by `kvengine eval`")
    rep.add_argument(
        "--out-dir",
        default=None,
        help="where eval_report.md and the PNGs go (default: the folder of RESULTS)",
    )


def run_report_command(args: argparse.Namespace) -> None:
    """Run `kvengine report`: print the path of every file written."""
    from kvengine.eval.report import write_report

    results = Path(args.results)
    for path in write_report(results, Path(args.out_dir) if args.out_dir else results.parent):
        print(path)
