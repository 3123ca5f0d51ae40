"""The command line: --help everywhere, one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from kvengine.cli import build_parser, main

COMMANDS = [
    [],
    ["generate"],
    ["demo"],
    ["bench"],
    ["bench", "decode"],
    ["bench", "presses"],
    ["simulate"],
    ["presses"],
    ["models"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "kvengine")
def test_every_command_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kvengine")
    assert len(out.splitlines()) > 3


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
        (["bench", "presses", "--kivi", "3"], "KIVI bit widths are 2, 4 or 8"),
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
