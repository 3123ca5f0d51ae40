"""Pieces every `kvengine` subcommand shares: the parser class, config and press options, input files.

Bad arguments end with one line on stderr and exit code `EXIT_BAD_INPUT`. Cache and scheduler
options are derived from the config dataclasses' fields, so the CLI and the Python API cannot
drift apart. Outputs default to `results_dir()`. This module defines no subcommand.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from kvengine.cli.argtypes import byte_size, positive_int_list
from kvengine.config import DEFAULT_MODEL, WEIGHTS_CHOICES, check_device_name, default_cache_dir
from kvengine.errors import InvalidRequestError
from kvengine.models.precision import DTYPE_CHOICES

if TYPE_CHECKING:
    from kvengine.press.base import Press

EXIT_BAD_INPUT = 2


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_args(parser: argparse.ArgumentParser, cls: type, help_text: dict[str, str]) -> None:
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
        # Fields in bytes take sizes with units ("2GiB", "512MiB") as well as plain integers.
        kind = byte_size if f.name.endswith("_bytes") and isinstance(default, int) else type(default)
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            type=kind,
            default=default,
            metavar=f.name.upper(),
            help=f"{help_text.get(f.name, '')} (default: {default})",
        )


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """An instance of config dataclass `cls` built from the options `add_config_args` added."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


CONFIG_HELP = {
    "block_size": "tokens per KV block",
    "max_kv_bytes": "bytes of key/value memory in the block pool",
    "max_num_seqs": "sequences running at once",
    "prefix_cache": "keep finished requests' KV blocks for later requests with the same prefix",
    "eviction_policy": "what the prefix cache evicts first: lru, lfu, gdsf or predictive",
    "max_step_tokens": "prefill + decode tokens per forward pass",
    "kv_bits": "0: keys and values in the model's dtype; 2, 3, 4 or 8: packed KIVI blocks",
    "kv_rotate": "rotate keys and values (randomized Hadamard, QuaRot-style) before packing them",
    "kv_key_groups": "packed keys quantized per channel (KIVI) or per token",
    "select_blocks": "quest: each head reads this fraction of its blocks per decode step (0: all)",
    "tiers": "storage below the pool for the prefix cache, comma-separated, fastest first: host,disk,redis",
    "tier_write": "through: store cached blocks at once (other processes see them); back: when evicted",
    "host_tier_bytes": "bytes of the host-memory tier",
    "disk_tier_dir": "directory of the disk tier (default: <cache dir>/kv-blocks); survives restarts",
    "disk_tier_bytes": "bytes of the disk tier",
    "redis_url": "the Redis server of the redis tier (shared by every kvengine process using it)",
    "tier_secret_file": "file holding the secret that authenticates tier blobs (default: "
    "$KVENGINE_TIER_SECRET, else <cache dir>/tier-secret, made once with mode 0600 and shared by "
    "this user's processes); hosts sharing a Redis tier must all use the same secret",
}


def results_dir() -> Path:
    """Where `bench` and `eval` write rows and reports when not told: `<cache dir>/results`.

    Never a path inside a source checkout: a repository that keeps its results
    passes `--out` (the Makefile does for `make bench`).
    """
    return default_cache_dir() / "results"


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
    """`KEY=VALUE` as (key, value); VALUE is a Python literal where it parses as one, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        parsed = value
    return key.strip(), parsed


def add_press_args(parser: argparse.ArgumentParser) -> None:
    """`--press`, `--ratio` and `--press-arg`, read back by `press_from_args`."""
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
        "--kv-budget",
        type=float,
        default=None,
        metavar="FRACTION",
        help="bytes the compressed context may hold, as a fraction of its uncompressed cache: "
        "--ratio 1 - FRACTION (demote: full precision for the best tokens, the rest packed)",
    )
    group.add_argument(
        "--press-arg",
        type=_press_arg,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a hyperparameter of the press (repeatable), e.g. window_size=32",
    )


def press_from_args(args: argparse.Namespace) -> Press | None:
    """The press the `add_press_args` options name, or None without `--press`."""
    from kvengine.press import press_from_spec

    if args.press is None:
        return None
    ratio = args.ratio
    if args.kv_budget is not None:
        if not 0.0 < args.kv_budget <= 1.0:
            raise InvalidRequestError(f"--kv-budget must be in (0, 1], got {args.kv_budget}")
        ratio = 1.0 - args.kv_budget
    return press_from_spec(args.press, ratio, **dict(args.press_arg))


def kivi_bits(text: str) -> list[int]:
    """Comma-separated KIVI bit widths (each 2, 3, 4 or 8), or `none` for no KIVI runs."""
    if text.strip() == "none":
        return []
    bits = positive_int_list(text)
    if any(b not in (2, 3, 4, 8) for b in bits):
        raise argparse.ArgumentTypeError(f"KIVI bit widths are 2, 3, 4 or 8, got {text!r}")
    return bits


def device_name(text: str) -> str:
    """A `--device` value as given, if kvengine knows the name (`config.DEVICE_CHOICES`)."""
    try:
        check_device_name(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """`--device`: where the model and its KV cache run (`models.device`; checked at load)."""
    parser.add_argument(
        "--device",
        type=device_name,
        default="auto",
        help="where weights, KV cache and every step run: auto (default: a CUDA GPU if torch sees one, "
        "else the CPU), cpu, cuda, cuda:N, mps, xpu",
    )


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--dtype` and `--device`: which model to load, in what precision, where."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="bundled model name or local HF directory")
    parser.add_argument(
        "--dtype",
        choices=DTYPE_CHOICES,
        default="auto",
        help="weights and KV cache precision; auto (default): bfloat16 where the hardware computes it "
        "natively (a CPU with AVX512-BF16 or AMX, a GPU), float32 elsewhere",
    )
    add_device_arg(parser)
    parser.add_argument(
        "--weights",
        choices=WEIGHTS_CHOICES,
        default="model",
        help="model (default): linear layers keep their weights in --dtype; int8 / int4: weight-only "
        "int8 / int4 in groups of 32 (llama.cpp's Q8_0 / Q4_1 layouts, a quarter / an eighth of "
        "float32's bytes; CPU only)",
    )


def add_output_args(parser: argparse.ArgumentParser, rows_file: str) -> None:
    """`--out` (JSON rows) and `--report` (Markdown), both appended to, under `results_dir()` by default."""
    parser.add_argument(
        "--out",
        default=str(results_dir() / rows_file),
        help="JSON rows are appended here (default: %(default)s)",
    )
    parser.add_argument(
        "--report",
        default=str(results_dir() / "benchmarks.md"),
        help="Markdown report to append to (default: %(default)s)",
    )
