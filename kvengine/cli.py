"""The `kvengine` command line: generate | serve | demo | bench | models.

Bad arguments and bad input end with one line on stderr and exit code 2;
cache and scheduler options are derived from the config dataclasses, so the
CLI and the Python API cannot drift apart.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kvengine.argtypes import name_list, positive_int, positive_int_list, ratio_list
from kvengine.bench.eval import add_eval_parser, run_eval_command
from kvengine.bench.plots import add_report_parser, run_report_command
from kvengine.bench.simulate import add_simulate_parser
from kvengine.config import DEFAULT_MODEL, CacheConfig, SchedulerConfig, ServerConfig
from kvengine.errors import InvalidRequestError, KVEngineError

if TYPE_CHECKING:
    from kvengine.press.base import Press

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_config_args(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str]) -> None:
    """One `--field-name` option per field of a config dataclass, defaulting to its default."""
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        default = f.default
        if isinstance(default, bool):  # type=bool would read "False" as True: --x / --no-x instead
            group.add_argument(
                "--" + f.name.replace("_", "-"),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text.get(f.name, '')} (default: {default})",
            )
            continue
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=default,
            metavar=f.name.upper(),
            help=f"{help_text.get(f.name, '')} (default: {default})",
        )


def _config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


_CONFIG_HELP = {
    "block_size": "tokens per KV block",
    "max_kv_bytes": "bytes of key/value memory in the block pool",
    "max_num_seqs": "sequences running at once",
    "prefix_cache": "keep finished requests' KV blocks for later requests with the same prefix",
    "eviction_policy": "what the prefix cache evicts first: lru, lfu, gdsf or predictive",
    "max_step_tokens": "prefill + decode tokens per forward pass",
}


def read_text_file(path: str) -> str:
    """A UTF-8 text file's contents; clear errors for a missing or non-UTF-8 file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def _press_arg(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def _add_press_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compression")
    group.add_argument(
        "--press",
        default=None,
        help="compression press by name, or WRAPPER:NAME (e.g. snapkv, adakv:expected_attention); "
        "see `kvengine presses`",
    )
    group.add_argument(
        "--ratio", type=float, default=0.5, help="fraction of the context to evict (default: 0.5)"
    )
    group.add_argument(
        "--press-arg",
        type=_press_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter of the press (repeatable), e.g. window_size=32",
    )


def _press_from_args(args: argparse.Namespace) -> Press | None:
    from kvengine.press import press_from_spec

    if args.press is None:
        return None
    return press_from_spec(args.press, args.ratio, **dict(args.press_arg))


def _kivi_bits(text: str) -> list[int]:
    if text.strip() == "none":
        return []
    bits = positive_int_list(text)
    if any(b not in (2, 4, 8) for b in bits):
        raise argparse.ArgumentTypeError(f"KIVI bit widths are 2, 4 or 8, got {text!r}")
    return bits


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kvengine",
        description="kvengine: a KV-cache engine for LLM inference (paged cache, compression, reuse).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    gen = sub.add_parser("generate", help="generate text for prompts", description=_GENERATE_HELP)
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="prompt text (one completion each)")
    gen.add_argument("--file", action="append", default=[], help="read a prompt from a UTF-8 file")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    gen.add_argument("--max-tokens", type=positive_int, default=128, help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    gen.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = off)")
    gen.add_argument("--seed", type=int, default=None, help="seed for sampling")
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    gen.add_argument("--system", default=None, help="system message for the chat template")
    gen.add_argument("--no-stream", action="store_true", help="print each completion when done")
    _add_press_args(gen)
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
    _add_config_args(gen, CacheConfig, _CONFIG_HELP)
    _add_config_args(gen, SchedulerConfig, _CONFIG_HELP)

    demo = sub.add_parser("demo", help="answer a question about a long document", description=_DEMO_HELP)
    demo.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    demo.add_argument("--doc-tokens", type=positive_int, default=2000, help="length of the document")

    bench = sub.add_parser("bench", help="benchmarks that write JSON rows and a Markdown report")
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCH", parser_class=_Parser)
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

    sub.add_parser("presses", help="list compression presses and their hyperparameters")

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
    pr.add_argument("--kivi", type=_kivi_bits, default=[2, 4], help="KIVI bit widths to compare, or 'none'")
    pr.add_argument("--examples", type=positive_int, default=4, help="needle examples per length")
    pr.add_argument("--out", default="docs/results/bench_presses.jsonl", help="JSON rows are appended here")
    pr.add_argument("--report", default="docs/benchmarks.md", help="Markdown report to append to")

    models = sub.add_parser("models", help="list bundled models and whether they are converted")
    models.add_argument("--cache-dir", default=None, help="where converted weights live")

    _add_serving_bench_parsers(bench_sub)
    _add_serve_parser(sub)
    add_simulate_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    return parser


def _add_serve_parser(sub: argparse._SubParsersAction) -> None:
    """`serve`: the OpenAI-compatible HTTP server (kvengine/server)."""
    defaults = ServerConfig()
    sv = sub.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=_SERVE_HELP
    )
    sv.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    sv.add_argument("--host", default=defaults.host, help=f"address to listen on (default: {defaults.host})")
    sv.add_argument("--port", type=int, default=defaults.port, help=f"port (default: {defaults.port})")
    sv.add_argument(
        "--api-key", action="append", default=[], help="accepted Bearer key (repeatable; none: no auth)"
    )
    limits = {
        "max_prompt_tokens": "longest prompt accepted, in tokens",
        "max_tokens_limit": "largest max_tokens a request may ask for",
        "max_concurrent_requests": "requests in flight at once; more get 429",
        "max_body_bytes": "largest request body; larger gets 413",
    }
    for name, text in limits.items():
        sv.add_argument(
            "--" + name.replace("_", "-"),
            type=positive_int,
            default=getattr(defaults, name),
            help=f"{text} (default: {getattr(defaults, name)})",
        )
    _add_config_args(sv, CacheConfig, _CONFIG_HELP)
    _add_config_args(sv, SchedulerConfig, _CONFIG_HELP)


_SERVE_HELP = """Serve the model at /v1/completions, /v1/chat/completions (streaming with
"stream": true), /v1/models and /health. Extra body fields "kv_press" and "kv_compression_ratio"
compress a request's prompt with a registered press. With --api-key, each key is a tenant of the
prefix cache. Ctrl-C shuts down gracefully: running requests are aborted and the engine closed."""


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


_THROUGHPUT_HELP = """Serve 1, 4, 16, 32 requests at once (all added together, greedy, no EOS stop)
and report output tokens/s next to transformers' generate serving requests one at a time, in the
same run. Rows are appended as JSON lines to --out, and a table to --report."""
_PREFIX_HELP = """Time to first token of a request whose --prefix-len-token prefix is in the prefix
cache, against the same request on a cold cache (fresh engine per repeat). Rows are appended as JSON
lines to --out, and a table to --report."""
_PRESSES_HELP = """For each context length, build needle-in-a-haystack examples, prefill each
context once, compress a copy of its cache with every press at every ratio, and ask for the
needle. Also runs KIVI packed caches. Writes accuracy, bytes held (fraction of the uncompressed
cache) and compression time over prefill time as JSON rows and a Markdown table."""
_GENERATE_HELP = """Generate completions through kvengine's paged KV cache. Prompts come from
the command line and from --file; with one prompt, text is streamed as it is produced. The chat
template is applied for chat models unless --no-chat. Timing and KV bytes go to stderr."""
_DEMO_HELP = """Load the bundled model, build a long document with one fact hidden in it,
ask about that fact, and print the answer, the KV-cache bytes held, time to first token and
decode speed."""
_BENCH_HELP = """Measure prefill and decode tokens/s of kvengine and of transformers' generate
(its own dynamic cache, SDPA attention) in the same run, on the same prompts. Rows are appended
as JSON lines to --out, and a table to --report."""


def _cmd_generate(args: argparse.Namespace) -> None:
    from kvengine.engine.generate import generate
    from kvengine.models import load

    prompts = list(args.prompts) + [read_text_file(p) for p in args.file]
    if not prompts:
        raise InvalidRequestError("no prompt given: pass PROMPT or --file")
    cache = _config_from_args(CacheConfig, args)
    scheduler = _config_from_args(SchedulerConfig, args)
    press = _press_from_args(args)
    model = load(args.model)
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
    from kvengine.demo import run_demo

    run_demo(args.model, args.doc_tokens)


def _cmd_bench(args: argparse.Namespace) -> None:
    if args.bench in ("throughput", "prefix"):
        _cmd_bench_serving(args)
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


def _cmd_models(args: argparse.Namespace) -> None:
    from kvengine.models import describe_bundled

    for line in describe_bundled(Path(args.cache_dir) if args.cache_dir else None):
        print(line)


def _cmd_presses(args: argparse.Namespace) -> None:
    from kvengine.press import PRESSES

    for name, cls in sorted(PRESSES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        fields = ", ".join(
            f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
            for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            if not f.name.startswith("_")
        )
        print(f"{name:20s} {doc}\n{'':20s} fields: {fields}")


def _cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from kvengine.engine.async_engine import AsyncEngine
    from kvengine.engine.engine import Engine
    from kvengine.models import load
    from kvengine.server import create_app

    config = ServerConfig(
        host=args.host,
        port=args.port,
        api_keys=tuple(args.api_key),
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_concurrent_requests=args.max_concurrent_requests,
        max_body_bytes=args.max_body_bytes,
    )
    cache = _config_from_args(CacheConfig, args)
    scheduler = _config_from_args(SchedulerConfig, args)
    model = load(args.model)
    engine = AsyncEngine(Engine(model, cache, scheduler))
    # Streams still open after the grace period are cancelled (aborting their requests), then the
    # app's lifespan closes the engine.
    uvicorn.run(
        create_app(engine, model, config), host=config.host, port=config.port, timeout_graceful_shutdown=10
    )


def _cmd_simulate(args: argparse.Namespace) -> None:
    from kvengine.bench.simulate import run_simulate_command

    run_simulate_command(args)


_COMMANDS = {
    "generate": _cmd_generate,
    "demo": _cmd_demo,
    "bench": _cmd_bench,
    "models": _cmd_models,
    "presses": _cmd_presses,
    "serve": _cmd_serve,
    "simulate": _cmd_simulate,
    "eval": run_eval_command,
    "report": run_report_command,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        _COMMANDS[args.command](args)
    except KVEngineError as exc:
        print(f"kvengine {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
