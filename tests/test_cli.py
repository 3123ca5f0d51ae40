"""The command line: options derived from the config dataclasses, one-line errors with exit code 2."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from kvengine.cli import build_parser, main
from kvengine.cli.common import config_from_args
from kvengine.config import CacheConfig, SchedulerConfig

# The commands whose cache and scheduler options are derived from the config dataclasses.
CONFIG_COMMANDS = [["generate"], ["serve"], ["bench", "serve"]]
# Configs that set every field off its default (KIVI and storage tiers exclude each other: two caches).
CONFIGS = [
    CacheConfig(block_size=32, max_kv_bytes=2**20, kv_bits=4, kv_rotate=True, kv_key_groups="token"),
    CacheConfig(
        prefix_cache=True, eviction_policy="lfu", tiers="host,disk", tier_write="back",
        host_tier_bytes=2**21, disk_tier_dir="/tmp/kv-blocks", disk_tier_bytes=2**22,
        redis_url="redis://cache:6380/1", tier_secret_file="/etc/kvengine/tier-secret", select_blocks=0.25,
    ),
    SchedulerConfig(max_num_seqs=3, max_step_tokens=64),
]  # fmt: skip


def options_of(config: object) -> list[str]:
    """The command-line options that set `config`'s fields that differ from their defaults."""
    argv = []
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value, flag = getattr(config, f.name), "--" + f.name.replace("_", "-")
        if value == f.default:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


def test_the_config_cases_set_every_field() -> None:
    """So that a field added to a config is parsed below at once (or this fails until it is)."""
    for cls in (CacheConfig, SchedulerConfig):
        changed = {
            f.name
            for c in CONFIGS
            if type(c) is cls
            for f in dataclasses.fields(c)
            if getattr(c, f.name) != f.default
        }
        assert changed == {f.name for f in dataclasses.fields(cls)}, cls.__name__


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_config_options_parse_to_the_config(command: list[str], config: object) -> None:
    args = build_parser().parse_args([*command, *options_of(config)])
    assert config_from_args(type(config), args) == config
    defaults = build_parser().parse_args(command)
    assert config_from_args(type(config), defaults) == type(config)()


@pytest.mark.parametrize("command", CONFIG_COMMANDS, ids=" ".join)
def test_help_lists_every_config_option(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for cls in (CacheConfig, SchedulerConfig):
        for f in dataclasses.fields(cls):
            assert "--" + f.name.replace("_", "-") in out, f.name


def test_generate_help_lists_config_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in [
        "--max-tokens",
        "--temperature",
        "--top-p",
        "--top-k",
        "--seed",
        "--stop",
        "--block-size",
        "--max-kv-bytes",
    ]:
        assert option in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["frobnicate"], "invalid choice"),
        (["generate", "hi", "--max-tokens", "0"], "must be >= 1"),
        (["generate", "hi", "--max-tokens", "-4"], "must be >= 1"),
        (["generate", "hi", "--max-tokens", "many"], "expected an integer"),
        (["generate", "hi", "--temperature", "hot"], "invalid float value"),
        (["bench", "decode", "--lengths", "512,x"], "expected an integer, got 'x'"),
        (["bench", "decode", "--lengths", "0"], "must be >= 1, got 0"),
        (["bench", "presses", "--kivi", "5"], "KIVI bit widths are 2, 3, 4 or 8"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["generate", "--model", "no-such-model"], "no prompt given"),
        (["generate", "hi", "--block-size", "0"], "block_size must be >= 1"),
        (["generate", "--file", "/no/such/file.txt"], "cannot read /no/such/file.txt"),
        (["serve", "no-such-model"], "unknown model 'no-such-model'"),
        (["serve", "a-model", "--model", "another"], "two models given"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_non_utf8_file_is_rejected(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    assert main(["generate", "--file", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is not UTF-8 text (byte 0xe9 at offset 3)") and len(err.splitlines()) == 1


def test_parser_builds_configs_from_dataclass_fields() -> None:
    args = build_parser().parse_args(["generate", "x", "--block-size", "32", "--max-step-tokens", "64"])
    assert args.block_size == 32 and args.max_step_tokens == 64 and args.max_num_seqs == 64


def test_demo_comparison_table_and_plot(tmp_path: Path) -> None:
    """The demo's press comparison: one table line per cache setting, equal to eval's summary, and a PNG."""
    from conftest import tiny_model
    from test_tasks import ByteTokenizer

    from kvengine.cli.demo import COMPARE_PRESSES, compare_presses
    from kvengine.eval.summary import load_rows, summarize

    model = tiny_model("llama")
    model.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    table, plot = compare_presses(model, tmp_path, length=160, num_examples=2, max_new_tokens=2)
    assert plot == tmp_path / "demo_accuracy_vs_kv_bytes.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = table.splitlines()
    assert lines[0].startswith("| cache | ratio | accuracy | KV MiB held | KV bytes / full | s / example |")
    names = [line.split(" | ")[0].lstrip("| ") for line in lines[2:]]
    assert sorted(names) == sorted([*COMPARE_PRESSES, "kivi-2"])
    rows = load_rows(tmp_path / "demo_eval.jsonl")
    assert len(rows) == 2 * (len(COMPARE_PRESSES) + 1)  # 2 examples, every press and KIVI
    for s in summarize(rows):
        if s.task == "all" and s.setting[0] == "knorm":
            assert f"| knorm | 0.50 | {s.accuracy:.2f} | {s.kv_mib:.1f} | {s.kv_fraction:.3f} |" in table
            assert 0.45 < s.kv_fraction < 0.55
    # A second run replaces the rows instead of resuming from them.
    compare_presses(model, tmp_path, length=160, num_examples=1, max_new_tokens=2)
    assert len(load_rows(tmp_path / "demo_eval.jsonl")) == len(COMPARE_PRESSES) + 1


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("4096", 4096), ("3 kib", 3072)],
)
def test_byte_sizes_take_units(text: str, expected: int) -> None:
    from kvengine.cli import build_parser

    args = build_parser().parse_args(["generate", "x", "--max-kv-bytes", text])
    assert args.max_kv_bytes == expected


@pytest.mark.parametrize("text", ["0", "-1", "2XB", "GiB", "nan", "1e400GiB"])
def test_bad_byte_sizes_name_the_problem(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    from kvengine.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--max-kv-bytes", text])
    assert exit_info.value.code == 2
    assert "--max-kv-bytes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "model"),
    [
        (["serve"], "smollm2-135m"),
        (["serve", "/models/dir"], "/models/dir"),
        (["serve", "w.gguf", "--port", "9"], "w.gguf"),
        (["serve", "--model", "m"], "m"),
        (["serve", "m", "--model", "m"], "m"),
    ],
)
def test_serve_takes_the_model_as_an_argument_or_option(argv: list[str], model: str) -> None:
    from kvengine.cli.serve import model_of

    args = build_parser().parse_args([*argv, "--served-model-name", "alias"])
    assert model_of(args) == model and args.served_model_name == "alias"
