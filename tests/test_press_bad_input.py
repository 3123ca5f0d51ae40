"""Bad compression input: clear errors from the Python API and the CLI (exit code 2, one line)."""

from __future__ import annotations

import pytest

from kvengine.cli import main
from kvengine.config import CacheConfig
from kvengine.errors import InvalidRequestError
from kvengine.press import PRESSES, make_press, press_from_spec


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1, float("nan"), "half", True])
@pytest.mark.parametrize("name", sorted(set(PRESSES) - {"none", "adakv", "per_layer"}))
def test_ratio_outside_0_1_is_rejected(name: str, ratio: object) -> None:
    with pytest.raises(InvalidRequestError, match="ratio must be in \\[0, 1\\)"):
        make_press(name, ratio=ratio)


def test_unknown_press_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown press 'snapk'; known presses: .*snapkv"):
        make_press("snapk")
    with pytest.raises(InvalidRequestError, match="unknown press 'nope'"):
        press_from_spec("adakv:nope", 0.5)
    with pytest.raises(InvalidRequestError, match="bad press spec"):
        press_from_spec("adakv:", 0.5)


def test_unknown_hyperparameter_is_named() -> None:
    with pytest.raises(
        InvalidRequestError, match="press 'snapkv' has no hyperparameter 'windw'; it has: ratio, window_size"
    ):
        make_press("snapkv", ratio=0.5, windw=3)


@pytest.mark.parametrize("bits", [1, 5, 16, -2])
def test_kivi_bits_must_be_2_3_4_or_8(bits: int) -> None:
    with pytest.raises(InvalidRequestError, match="kv_bits must be 0 \\(off\\), 2, 3, 4 or 8"):
        CacheConfig(kv_bits=bits)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--press", "nope"], "unknown press 'nope'"),
        (["generate", "hi", "--press", "knorm", "--ratio", "1.5"], "ratio must be in [0, 1)"),
        (["generate", "hi", "--press", "knorm", "--ratio", "-0.25"], "ratio must be in [0, 1)"),
        (["generate", "hi", "--kv-bits", "5"], "kv_bits must be 0 (off), 2, 3, 4 or 8"),
        (["generate", "hi", "--press", "snapkv", "--press-arg", "kernel_size=4"], "kernel_size must be odd"),
    ],
)
def test_cli_reports_bad_compression_in_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "hi", "--press-arg", "window"], "expected KEY=VALUE"),
        (["bench", "presses", "--ratios", "0.5,1.0"], "ratios must be in [0, 1)"),
    ],
)
def test_cli_rejects_malformed_compression_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
