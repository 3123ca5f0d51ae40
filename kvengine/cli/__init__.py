"""The `kvengine` command line: generate | serve | cluster | demo | bench | models | presses | simulate | eval | report.

This module builds the top-level parser, holds the small commands (generate, demo, models and
presses) and `main`, which maps `KVEngineError` to one line on stderr and exit code 2.
Shared option helpers are in `common`, the benchmarks in `bench` (the load test in `bench_serve`),
the HTTP server in `serve`, eval and report in `eval`, the trace replay in `simulate`. Only this
package reads the command line; library code is given what it needs as arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from kvengine.cli.argtypes import positive_int
from kvengine.cli.bench import add_bench_parser, cmd_bench
from kvengine.cli.cluster import add_cluster_parser, cmd_cluster
from kvengine.cli.common import (
    CONFIG_HELP,
    EXIT_BAD_INPUT,
    Parser,
    add_config_args,
    add_model_args,
    add_press_args,
    config_from_args,
    press_from_args,
    read_text_file,
)
from kvengine.cli.eval import add_eval_parser, add_report_parser, run_eval_command, run_report_command
from kvengine.cli.serve import add_serve_parser, cmd_serve
from kvengine.cli.simulate import add_simulate_parser, run_simulate_command
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.errors import InvalidRequestError, KVEngineError

__all__ = ["EXIT_BAD_INPUT", "build_parser", "main", "read_text_file"]

_GENERATE_HELP = """Generate completions through kvengine's paged KV cache. Prompts come from
the command line and from --file; with one prompt, text is streamed as it is produced. The chat
template is applied for chat models unless --no-chat. Timing and KV bytes go to stderr."""
_DEMO_HELP = """Load the bundled model, build a long document with one fact hidden in it,
ask about that fact, and print the answer, the KV-cache bytes held, time to first token and
decode speed. Then compare knorm, streaming_llm,
snapkv, expected_attention (half the cache evicted) and 2-bit KIVI on 4 needle contexts of 2048
tokens: a Markdown table and a PNG plot under the cache directory (skip with --no-compare)."""


def build_parser() -> argparse.ArgumentParser:
    """The full `kvengine` parser; `args.command` names the entry of `_COMMANDS` to run."""
    parser = Parser(
        prog="kvengine",
        description="kvengine: a KV-cache engine for LLM inference (paged cache, compression, reuse).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    _add_generate_parser(sub)
    demo = sub.add_parser(
        "demo", help="answer a question about a long document, then compare presses", description=_DEMO_HELP
    )
    add_model_args(demo)
    demo.add_argument("--doc-tokens", type=positive_int, default=2000, help="length of the document")
    demo.add_argument(
        "--no-compare",
        action="store_true",
        help="skip the press comparison (4 presses and KIVI 2-bit on 4 needle contexts; about 1.5 min on 2 cores)",
    )
    add_bench_parser(sub)
    sub.add_parser("presses", help="list compression presses and their hyperparameters")
    models = sub.add_parser("models", help="list bundled models and whether they are converted")
    models.add_argument("--cache-dir", default=None, help="where converted weights live")
    add_serve_parser(sub)
    add_cluster_parser(sub)
    add_simulate_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    return parser


def _add_generate_parser(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="generate text for prompts", description=_GENERATE_HELP)
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (one completion each)")
    gen.add_argument("--file", action="append", default=[], help="read a prompt from a UTF-8 file")
    add_model_args(gen)
    gen.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print each completion when done")
    add_press_args(gen)
    gen.add_argument(
        "--question",
        action="append",
        default=None,
        help="ask this question about each prompt (repeatable); with --press the prompt is compressed "
        "once, before the questions are seen",
    )
    gen.add_argument(
        "--query-aware", action="store_true", help="compress each prompt together with its question"
    )
    add_config_args(gen, CacheConfig, CONFIG_HELP)
    add_config_args(gen, SchedulerConfig, CONFIG_HELP)


def _cmd_generate(args: argparse.Namespace) -> None:
    from kvengine.engine.generate import generate
    from kvengine.models import load

    prompts = list(args.prompts) + [read_text_file(p) for p in args.file]
    if not prompts:
        raise InvalidRequestError("no prompt given: pass PROMPT or --file")
    cache = config_from_args(CacheConfig, args)
    scheduler = config_from_args(SchedulerConfig, args)
    press = press_from_args(args)
    model = load(args.model, dtype=args.dtype, device=args.device, weights=args.weights)
    stream = len(prompts) * len(args.question or [None]) == 1 and not args.no_stream

    def on_text(_: int, text: str) -> None:
        print(text, end="", flush=True)

    completions = generate(
        model,
        prompts,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop=args.stop,
        chat=False if args.no_chat else None,
        system=args.system,
        press=press,
        questions=args.question,
        query_aware=args.query_aware,
        on_text=on_text if stream else None,
        cache_config=cache,
        scheduler_config=scheduler,
    )
    for c in completions:
        if stream:
            print()
        else:
            print(f"--- completion {c.index} ---\n{c.text}")
        print(
            f"[{c.num_prompt_tokens} prompt tokens, {len(c.token_ids)} generated, finish: {c.finish_reason}, "
            f"ttft {c.ttft_s:.2f} s, decode {c.decode_tokens_per_s:.1f} tok/s, KV {c.kv_bytes / 2**20:.1f} MiB]",
            file=sys.stderr,
        )


def _cmd_demo(args: argparse.Namespace) -> None:
    from kvengine.cli.demo import run_demo

    run_demo(
        args.model,
        args.doc_tokens,
        compare=not args.no_compare,
        dtype=args.dtype,
        device=args.device,
        weights=args.weights,
    )


def _cmd_models(args: argparse.Namespace) -> None:
    from kvengine.models import describe_bundled

    for line in describe_bundled(Path(args.cache_dir) if args.cache_dir else None):
        print(line)


def _cmd_presses(args: argparse.Namespace) -> None:
    from kvengine.press import PRESSES
    from kvengine.press.methods import METHODS  # methods that are not per-layer presses (quest, duo)

    for name, cls in sorted({**PRESSES, **METHODS}.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        fields = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.name.startswith("_")
        )
        print(f"{name:20s} {doc}\n{'':20s} fields: {fields}")
    # Storage choices of the cache, not presses: they compose with any press (CacheConfig fields).
    print(f"{'kivi':20s} Packed low-bit blocks, keys per channel, values per token (KIVI, arXiv:2402.02750).")
    print(f"{'':20s} cache options: --kv-bits 2|3|4|8, --kv-key-groups channel|token")
    print(f"{'rotated':20s} KIVI blocks rotated first by a randomized Hadamard transform (QuaRot).")
    print(f"{'':20s} cache options: --kv-bits 2|3|4|8 --kv-rotate, --kv-key-groups channel|token")


_COMMANDS = {
    "generate": _cmd_generate,
    "demo": _cmd_demo,
    "bench": cmd_bench,
    "models": _cmd_models,
    "presses": _cmd_presses,
    "serve": cmd_serve,
    "cluster": cmd_cluster,
    "simulate": run_simulate_command,
    "eval": run_eval_command,
    "report": run_report_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command `argv` names (default: sys.argv); 0 on success, 2 on bad input, 130 on Ctrl-C.

    Commands find the command line itself in `args.command_line` (benchmarks record it in reports).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = " ".join(["kvengine", *argv])
    try:
        _COMMANDS[args.command](args)
    except KVEngineError as exc:
        print(f"kvengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
