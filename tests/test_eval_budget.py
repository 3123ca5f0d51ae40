"""Byte budgets against the 16-bit cache in `kvengine eval`: planned ratios, measured bytes, packed copies.

References: the 16-bit cache's bytes counted by hand (2 bytes x keys and
values x layers x kv-heads x head dim x tokens); a packed engine's own
prefill for the packed "none" copy; the plain engine's kept positions for
presses and duo that evict before packing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model
from test_engine import random_prompt
from test_tasks import ByteTokenizer

from kvengine.cli.eval import ratio_budget_list
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.errors import InvalidRequestError
from kvengine.eval.budget import budget_settings, bytes_16bit, ratio_for_budget, storage_bytes_per_token
from kvengine.eval.runner import EvalConfig, run_eval
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec
from kvengine.press.duo import DuoAttention
from kvengine.press.none import NoPress

SCORES = ((0.9, 0.01), (0.02, 0.5), (0.03, 0.04))  # 3 layers x 2 kv-heads of the tiny model
PRESSES = ("none", "snapkv", "streaming_llm", "demote:snapkv")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    m = tiny_model("llama")
    m.tokenizer = ByteTokenizer()  # type: ignore[assignment]
    return m


def test_bytes_16bit_by_hand(model: LoadedModel) -> None:
    # tiny llama: 3 layers, 2 kv-heads, head dim 16; keys and values at 2 bytes each
    assert bytes_16bit(model, 100) == 100 * 3 * 2 * 16 * 2 * 2
    assert storage_bytes_per_token(model, 0) == 2 * 16 * 4  # the float32 pool
    # 2-bit, per-channel keys, 16-value groups, 32-token blocks: codes 2 x 32 x 16 x 2 bits,
    # key scale+zero per channel (2 x 16 x 2 B), value scale+zero per token (2 x 32 x 2 B)
    assert storage_bytes_per_token(model, 2) == (2 * 32 * 16 * 2 // 8 + 2 * 16 * 2 + 2 * 32 * 2) / 32


@pytest.mark.parametrize("budget", [0.25, 0.125])
def test_ratios_hold_the_budget(model: LoadedModel, budget: float) -> None:
    n = 1000
    fp = ratio_for_budget("snapkv", 0, budget, model, n)
    # Half the float32 tokens make the 16-bit budget, less the block a cell keeps open.
    assert 1 - budget / 2 < fp < 1 - budget / 2 + 0.02
    assert ratio_for_budget("demote:snapkv", 2, budget, model, n) == 1 - budget / 2
    packed = ratio_for_budget("snapkv", 2, budget, model, n)
    kept = (1 - packed) * n * storage_bytes_per_token(model, 2) + 32 * storage_bytes_per_token(model, 0)
    assert kept <= budget * n * 4 * 16 < kept + 1e-3 * n * 4 * 16
    assert ratio_for_budget("snapkv", 8, 0.9, model, n) == 0.0  # 8-bit storage alone fits
    with pytest.raises(InvalidRequestError, match="cannot hold even the block"):
        ratio_for_budget("snapkv", 2, 0.01, model, 100)
    with pytest.raises(InvalidRequestError, match=r"in \(0, 1\], got 0"):
        ratio_for_budget("snapkv", 0, 0.0, model, n)


def test_budget_settings_leave_out_presses_whose_storage_fits(model: LoadedModel) -> None:
    got = budget_settings(PRESSES, ("snapkv",), (8, 2), (0.9, 0.25), model, 1000)
    f = ratio_for_budget
    assert got == [
        ("none", 0.0, 0),
        *(("snapkv", f("snapkv", 0, b, model, 1000), 0) for b in (0.9, 0.25)),
        *(("streaming_llm", f("streaming_llm", 0, b, model, 1000), 0) for b in (0.9, 0.25)),
        ("none", 0.0, 8),
        ("demote:snapkv", 0.55, 8),
        ("demote:snapkv", 0.875, 8),
        ("snapkv", f("snapkv", 8, 0.25, model, 1000), 8),  # 8 bits (0.59 of 16-bit) fit 0.9 as they are
        ("none", 0.0, 2),
        ("demote:snapkv", 0.55, 2),
        ("demote:snapkv", 0.875, 2),
        ("snapkv", f("snapkv", 2, 0.25, model, 1000), 2),  # 2 bits (0.22) fit 0.9 too, not 0.25
    ]
    assert all(0 < s[1] < 1 for s in got if s[0] != "none")


def test_eval_rows_hold_their_budgets(model: LoadedModel, tmp_path: Path) -> None:
    """Every budgeted row holds at most its budget of the 16-bit cache, measured; none holds 2x (float32)."""
    cfg = EvalConfig(
        ("niah_single",), (600,), PRESSES, kivi=(2,), num_examples=1, max_new_tokens=2,
        budgets=(0.25, 0.125), packed_presses=("snapkv",), kv_rotate=True,
    )  # fmt: skip
    out = tmp_path / "r.jsonl"
    rows = run_eval(model, cfg, out, progress=False)
    assert [r["config"]["press"] for r in rows] == [s[0] for s in cfg.settings(model, 600)]
    for r in rows:
        assert r["kv_bytes_16bit"] == bytes_16bit(model, 600) == 600 * 3 * 2 * 2 * 16 * 2  # 600 byte tokens
        if r["config"]["kivi"]:  # the float32 cache of the same tokens (plain rows: whole 16-token blocks)
            assert r["kv_bytes_full"] == 2 * r["kv_bytes_16bit"]
        assert r["kv_fraction_16bit"] == r["kv_bytes"] / r["kv_bytes_16bit"]
        c = r["config"]
        if c["press"] == "none":
            assert "kv_budget_16bit" not in r
            if c["kivi"]:  # 19 packed blocks and one open one of float32 per cell
                assert 0.22 < r["kv_fraction_16bit"] < 0.4
            else:
                assert r["kv_fraction_16bit"] == 2 * 608 / 600  # float32, in whole 16-token blocks
        else:
            assert r["kv_budget_16bit"] in (0.25, 0.125)
            assert r["kv_fraction_16bit"] <= r["kv_budget_16bit"]
            assert r["kv_fraction_16bit"] > 0.6 * r["kv_budget_16bit"]  # not far under it either
    from kvengine.eval.report import write_report

    table = write_report(out, tmp_path)[0].read_text()
    assert "| KV bytes / 16-bit |" in table and "| niah_single | none | 0.00 | - | 1 |" in table


def _packed_engine(model: LoadedModel, n: int) -> Engine:
    return Engine(
        model,
        CacheConfig(block_size=8, max_kv_bytes=8 * 2**20, kv_bits=3, kv_rotate=True),
        SchedulerConfig(max_num_seqs=4, max_step_tokens=n),
    )


def _cells(engine: Engine, context: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(positions, keys, values) each (layer, kv-head) cell of a context holds, as read back."""
    kv = engine.sequences[context].kv
    assert kv is not None
    out = []
    for layer in range(kv.block_table.shape[0]):
        for head in range(kv.block_table.shape[1]):
            n = int(kv.lens[layer, head])
            k, v = engine.pool.read(kv.slots[layer, head, :n])
            out.append((kv.positions[layer, head, :n].clone(), k, v))
    return out


def test_packed_copy_equals_a_packed_prefill(model: LoadedModel) -> None:
    """eval's packed "none": a keep-everything copy of a full-precision prefill, packed, is the packed prefill."""
    ids, n = random_prompt(75, 5), 75
    prefilled = _packed_engine(model, n)
    plain = prefilled.add_context(ids)
    prefilled.run()
    copied = _packed_engine(model, n)
    base = copied.add_context(ids, keep_queries=True)
    copied.run()
    copy = copied.compress_context(base, NoPress())
    for (p1, k1, v1), (p2, k2, v2) in zip(_cells(prefilled, plain), _cells(copied, copy), strict=True):
        assert torch.equal(p1, p2) and torch.equal(k1, k2) and torch.equal(v1, v2)
    held = prefilled.cache.bytes_held(prefilled.sequences[plain].kv)  # type: ignore[arg-type]
    assert held == copied.cache.bytes_held(copied.sequences[copy].kv)  # type: ignore[arg-type]
    assert prefilled.pool.num_used_packed_blocks == 3 * 2 * (75 // 8)  # the full blocks are packed


@pytest.mark.parametrize("spec", ["snapkv", "duo"])
def test_evicting_then_packing_keeps_what_the_plain_pool_keeps(model: LoadedModel, spec: str) -> None:
    """snapkv / duo on a packed pool: the same positions as on the plain pool, full blocks packed."""
    ids, n = random_prompt(90, 6), 90
    press: Any = DuoAttention(0.4, n_sink=2, window=9, head_scores=SCORES) if spec == "duo" else None
    press = press or press_from_spec(spec, 0.4)
    engines = [Engine(model, CacheConfig(block_size=8)), _packed_engine(model, n)]
    kept = []
    for engine in engines:
        base = engine.add_context(ids, keep_queries=True)
        engine.run()
        kept.append(_cells(engine, engine.compress_context(base, press)))
        engine.release(base)
    lens = []
    for (p_fp, k_fp, _), (p_q, k_q, _) in zip(*kept, strict=True):
        assert torch.equal(p_fp, p_q)
        lens.append(p_fp.numel())
        # 3-bit rotated keys: close to the float32 ones (the bound is tests/test_rotate.py's), not equal
        assert 0 < (k_fp - k_q).norm() <= 0.35 * k_fp.norm()
    packed = engines[1].pool
    assert packed.num_used_packed_blocks == sum(t // 8 for t in lens)  # every full block, sealed
    assert packed.num_used_open_blocks == sum(t % 8 > 0 for t in lens)
    if spec == "duo":
        assert sorted(set(lens)) == [11, 90]  # streaming heads: 2 sinks + 9 recent; the others all


def test_bad_budget_configs(model: LoadedModel) -> None:
    base: dict[str, Any] = dict(tasks=("niah_single",), presses=("none", "snapkv"))
    cases = [
        (dict(budgets=(0.0,)), r"budgets are fractions of the 16-bit cache in \(0, 1\]"),
        (dict(budgets=(1.5,)), r"budgets are fractions"),
        (dict(packed_presses=("snapkv",)), "packed_presses run on packed pools: give KIVI bit widths"),
        (dict(kivi=(2,), packed_presses=("demote:snapkv",)), "not 'demote:snapkv'"),
        (dict(kivi=(2,), packed_presses=("snapkvv",)), "unknown press 'snapkvv'"),
        (dict(presses=("none", "quest"), budgets=(0.25,)), "selection method holds the whole cache"),
    ]
    for kwargs, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            EvalConfig(**{**base, **kwargs})
    with pytest.raises(InvalidRequestError, match="need the model and the context length"):
        EvalConfig(**base, budgets=(0.25,)).settings()
    assert ratio_budget_list("0.25, 0.125") == [0.25, 0.125]
    for text in ("0", "x", "0.5,2"):
        with pytest.raises(argparse.ArgumentTypeError):
            ratio_budget_list(text)


def test_cli_eval_takes_budgets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvengine.cli import main

    out = tmp_path / "r.jsonl"
    rows: list[dict[str, Any]] = []

    def fake_run_eval(model: LoadedModel, cfg: EvalConfig, path: Path) -> list[dict[str, Any]]:
        rows.append({"budgets": cfg.budgets, "packed": cfg.packed_presses, "kivi": cfg.kivi})
        return []

    monkeypatch.setattr("kvengine.eval.runner.run_eval", fake_run_eval)
    monkeypatch.setattr("kvengine.models.load", lambda *a, **k: None)
    main(["eval", "--tasks", "niah_single", "--presses", "none,snapkv", "--kivi", "2",
          "--kv-budgets", "0.25,0.125", "--packed-presses", "snapkv,duo", "--out", str(out)])  # fmt: skip
    assert rows == [{"budgets": (0.25, 0.125), "packed": ("snapkv", "duo"), "kivi": (2,)}]


def test_report_states_bytes_of_the_16bit_cache_and_accuracy_of_full() -> None:
    from kvengine.eval.report import budget_section, summary_table
    from kvengine.eval.summary import summarize

    rows = []
    for press, ratio, kivi, values, held in [
        ("none", 0.0, 0, (1.0, 1.0, 0.0, 1.0), 200),
        ("snapkv", 0.5625, 3, (1.0, 0.0, 0.0, 1.0), 25),
        ("none", 0.0, 2, (1.0, 1.0, 1.0, 1.0), 20),
    ]:
        for i, value in enumerate(values):
            config = dict(
                task="needle_hard", length=4096, example=i, press=press, ratio=ratio, kivi=kivi, model="m"
            )
            rows.append(
                dict(bench="eval", value=value, config=config, kv_bytes=held + i, kv_bytes_full=200,
                     kv_bytes_16bit=100, kv_fraction_16bit=(held + i) / 100, prefill_s=1.0, compress_s=0.0,
                     answer_s=1.0)
            )  # fmt: skip
            if press != "none":
                rows[-1]["kv_budget_16bit"] = 0.25
    table = summary_table(summarize(rows))
    # accuracy 0.75 full; 0.5 -> 0.67 of full; 1.0 -> 1.33 of full. Bytes / 16-bit: mean of (held + i) / 100.
    assert "| needle_hard | none | 0.00 | - | 4 | 0.750 | 1.00 | 1.007 | 2.015 |" in table
    assert "| needle_hard | snapkv | 0.5625 | 3 | 4 | 0.500 | 0.67 | 0.133 | 0.265 |" in table
    assert "| needle_hard | none | 0.00 | 2 | 4 | 1.000 | 1.33 | 0.107 | 0.215 |" in table
    # Within 0.25 of the 16-bit cache: only KIVI 2-bit (0.215); snapkv + 3-bit (0.265) missed its budget.
    within = budget_section(summarize(rows), rows).splitlines()
    assert [line for line in within if line.startswith("| 0.25 ")] == [
        "| 0.25 | needle_hard | kivi-2 | 0.00 | 4 | 0.215 | 1.000 | 1.33 |",
        "| 0.25 | all | kivi-2 | 0.00 | 4 | 0.215 | 1.000 | 1.33 |",
    ]
    assert budget_section(summarize(rows[:4]), rows[:4]) == ""  # no row planned for a budget
