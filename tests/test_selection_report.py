"""`kvengine bench selection`'s tables: examples counted once, the bootstrap interval, earlier rows.

References: sums and ratios counted by hand from the rows written; the
bootstrap interval against its definition (every resample's ratio lies
between the smallest and largest per-example ratio when full scores 1).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvengine.bench.selection_report import bootstrap_ratio, load_results, summarize_file
from kvengine.results import append_rows, make_row


def example(task: str, seed: int, scores: dict[str, float], attention: dict[str, float]) -> list[dict]:  # type: ignore[type-arg]
    rows = [
        make_row("selection", "score", v, "fraction", system=s, task=task, length=64, seed=seed,
                 blocks_read=0 if s == "full" else 1, blocks_held=0 if s == "full" else 8)
        for s, v in scores.items()
    ]  # fmt: skip
    timings = {f"attention_{s}_b1": t for s, t in attention.items()}
    rows.append(
        make_row("selection", "example_medians_s", 0.0, "s", task=task, length=64, seed=seed, **timings)
    )
    return rows


def test_the_table_counts_each_example_once_per_task_and_pooled(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    times = {"full": 0.004, "quest": 0.001}
    append_rows(path, example("needle_hard", 0, {"full": 1.0, "quest": 0.0}, times))
    append_rows(path, example("needle_hard", 1, {"full": 1.0, "quest": 1.0}, times))
    append_rows(path, example("needle_hard", 1, {"full": 1.0, "quest": 1.0}, {"full": 0.008, "quest": 0.001}))
    append_rows(path, example("vt", 0, {"full": 0.5, "quest": 0.5}, times))
    append_rows(
        path, [make_row("selection", "score", 1.0, "fraction", system="full", task="vt", length=64, seed=9)]
    )
    lines = summarize_file(path).splitlines()
    assert lines[2].startswith("| needle_hard | 64 | quest | 2 | 2 | 1 | 0.50 | ")
    assert lines[2].endswith(" | 0.125 | 6.0 | 1.0 | 0.17 |")  # medians of the examples' medians
    assert lines[3].startswith("| vt | 64 | quest | 1 | 0.5 | 0.5 | 1.00 | 1.00-1.00 | 0.125 |")
    assert lines[4].startswith("| all | 64 | quest | 3 | 2.5 | 1.5 | 0.60 | ")
    only = summarize_file(path, tasks=["vt"]).splitlines()
    assert len(only) == 3 and only[2].startswith("| vt |")  # one task: no pooled row


def test_bootstrap_interval_lies_within_what_resamples_can_give() -> None:
    full, other = [1.0] * 20, [1.0] * 17 + [0.0] * 3
    low, high = bootstrap_ratio(full, other) or (0.0, 0.0)
    assert 0.6 <= low < 0.85 < high <= 1.0
    assert bootstrap_ratio(full, full) == (1.0, 1.0)
    assert bootstrap_ratio([0.0, 0.0], [1.0, 1.0]) is None
    assert bootstrap_ratio(full, other) == bootstrap_ratio(full, other)  # seeded


def test_rows_of_the_earlier_bench_are_read(tmp_path: Path) -> None:
    """Metric `correct`, no task, quest's blocks and `selection_b1` in the medians row."""
    path = tmp_path / "old.jsonl"
    rows = [make_row("selection", "correct", v, "bool", system=s, length=64, seed=0) for s, v in
            (("full", 1.0), ("quest", 1.0), ("quest_heads=max", 0.0))]  # fmt: skip
    rows.append(make_row("selection", "example_medians_s", 0.0, "s", length=64, seed=0, attention_full_b1=0.004,
                         attention_quest_b1=0.001, selection_b1=0.0005, blocks_read=2, blocks_held=8))  # fmt: skip
    append_rows(path, rows)
    answers, medians = load_results(path)
    assert answers["needle_hard", 64, 0]["quest"].blocks_read == 2
    assert medians["needle_hard", 64, 0]["selection_quest_b1"] == 0.0005
    lines = summarize_file(path).splitlines()
    assert (
        lines[2] == "| needle_hard | 64 | quest | 1 | 1 | 1 | 1.00 | 1.00-1.00 | 0.250 | 4.0 | 1.0 | 0.25 |"
    )
    assert lines[3].startswith("| needle_hard | 64 | quest_heads=max | 1 | 1 | 0 | 0.00 | 0.00-0.00 | nan |")


def test_settings_take_their_own_ratio_and_bad_ones_are_named() -> None:
    from kvengine.bench.selection import build_selections
    from kvengine.errors import InvalidRequestError

    sel = build_selections(0.86, {"heads": "sum"}, [{"ratio": 0.915, "dense_layers": 2}, {"heads": "mass"}])
    assert list(sel) == ["full", "quest", "quest_ratio=0.915,dense_layers=2", "quest_heads=mass"]
    dense, mass, quest = sel["quest_ratio=0.915,dense_layers=2"], sel["quest_heads=mass"], sel["quest"]
    assert dense is not None and mass is not None and quest is not None and sel["full"] is None
    assert (round(dense.fraction, 6), dense.dense_layers, dense.heads) == (0.085, 2, "sum")
    assert (round(mass.fraction, 6), mass.heads, round(quest.fraction, 6)) == (0.14, "mass", 0.14)
    with pytest.raises(InvalidRequestError, match="ratio must be a number, got 'x' in quest_ratio=x"):
        build_selections(0.86, None, [{"ratio": "x"}])
    with pytest.raises(InvalidRequestError, match="compression ratio"):
        build_selections(0.86, None, [{"ratio": 1.0}])
    with pytest.raises(InvalidRequestError, match="heads must be one of 'sum', 'max', 'mass', got 'mean'"):
        build_selections(0.86, {"heads": "mean"})
