"""Tables of `kvengine bench selection` rows: accuracy per task and setting against full, with intervals.

Reads the JSONL that `kvengine.bench.selection` appends (one row per
(example, system) with its score and blocks read, and one row of the
example's timing medians) and renders, per (length, task, setting) and
pooled over tasks: full attention's summed score, the setting's, their
ratio with a 95% bootstrap interval over examples (paired: an example's
full and setting answers are resampled together), the fraction of blocks
read (every layer, dense ones read in full), and the attention time of one
decode step against full's in the same run. Rows of earlier versions of the
bench (metric `correct`, no task: `needle_hard`) are read too. The last
row of an (example, system) wins, so a rerun replaces what it redoes.

This module only reads rows and formats; it runs no model.
"""

from __future__ import annotations

import json
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvengine.results import markdown_table

POOLED = "all"  # the task name of rows pooled over every task


@dataclass
class Answer:
    """One system's answers to one example: its score (mean over questions) and the blocks it read."""

    score: float
    blocks_read: int = 0
    blocks_held: int = 0


Key = tuple[str, int, int]  # (task, length, seed)


def load_results(path: Path) -> tuple[dict[Key, dict[str, Answer]], dict[Key, dict[str, Any]]]:
    """Answers per example and system, and each example's timing medians (last row wins)."""
    answers: dict[Key, dict[str, Answer]] = defaultdict(dict)
    medians: dict[Key, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        cfg = row["config"]
        if row.get("bench") != "selection" or "seed" not in cfg:
            continue
        key = (cfg.get("task", "needle_hard"), int(cfg["length"]), int(cfg["seed"]))
        if row["metric"] in ("score", "correct"):
            read, held = cfg.get("blocks_read", 0), cfg.get("blocks_held", 0)
            answers[key][cfg["system"]] = Answer(float(row["value"]), read, held)
        elif row["metric"] == "example_medians_s":
            medians[key] = {_current_name(k): v for k, v in cfg.items()}
    for key, cfg in medians.items():  # earlier rows kept quest's blocks with the medians
        quest = answers.get(key, {}).get("quest")
        if quest is not None and not quest.blocks_held and "blocks_held" in cfg:
            quest.blocks_read, quest.blocks_held = cfg["blocks_read"], cfg["blocks_held"]
    return answers, medians


def _current_name(key: str) -> str:
    """Earlier rows' `selection_b1` is quest's: `selection_quest_b1`."""
    return "selection_quest_" + key.removeprefix("selection_") if key.startswith("selection_b") else key


def bootstrap_ratio(
    full: list[float], other: list[float], resamples: int = 2000, seed: int = 0
) -> tuple[float, float] | None:
    """95% percentile interval of sum(other) / sum(full) over examples resampled in pairs; None if full is 0."""
    if len(full) != len(other) or not full or sum(full) == 0:
        return None
    rng = random.Random(seed)
    n, ratios = len(full), []
    for _ in range(resamples):
        picks = [rng.randrange(n) for _ in range(n)]
        denominator = sum(full[i] for i in picks)
        if denominator:
            ratios.append(sum(other[i] for i in picks) / denominator)
    ratios.sort()
    return ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _median_ms(medians: list[dict[str, Any]], key: str) -> float | None:
    values = [m[key] for m in medians if key in m]
    return 1000 * statistics.median(values) if values else None


def _row(
    label: tuple[str, int, str], keys: list[Key], answers: dict[Key, dict[str, Answer]],
    medians: dict[Key, dict[str, Any]], batch: int | None,
) -> list[Any]:  # fmt: skip
    """One table row: a setting's answers on `keys` against full's, blocks read, attention time."""
    task, length, system = label
    full = [answers[k]["full"].score for k in keys]
    mine = [answers[k][system].score for k in keys]
    held = sum(answers[k][system].blocks_held for k in keys)
    read = sum(answers[k][system].blocks_read for k in keys) / held if held else float("nan")
    interval = bootstrap_ratio(full, mine)
    ratio = f"{sum(mine) / sum(full):.2f}" if sum(full) else "-"
    timed = [medians[k] for k in keys if k in medians]
    att = ["-", "-", "-"]
    if batch is not None:
        full_ms = _median_ms(timed, f"attention_full_b{batch}")
        own_ms = _median_ms(timed, f"attention_{system}_b{batch}")
        if full_ms and own_ms:
            att = [f"{full_ms:.1f}", f"{own_ms:.1f}", f"{own_ms / full_ms:.2f}"]
    return [
        task, length, system, len(keys), _fmt(sum(full)), _fmt(sum(mine)), ratio,
        f"{interval[0]:.2f}-{interval[1]:.2f}" if interval else "-", f"{read:.3f}", *att,
    ]  # fmt: skip


def summary_table(
    answers: dict[Key, dict[str, Answer]], medians: dict[Key, dict[str, Any]],
    tasks: list[str] | None = None, lengths: list[int] | None = None,
) -> str:  # fmt: skip
    """Markdown: per (length, task, setting) and pooled over tasks, each setting against full."""
    batches = sorted(
        {int(k.rsplit("_b", 1)[1]) for m in medians.values() for k in m if k.startswith("attention_")}
    )
    batch = batches[0] if batches else None
    groups: dict[tuple[str, int, str], list[Key]] = defaultdict(list)
    for key, systems in sorted(answers.items()):
        task, length, _ = key
        if "full" not in systems or (tasks and task not in tasks) or (lengths and length not in lengths):
            continue
        for system in systems:
            if system != "full":
                groups[task, length, system].append(key)
                groups[POOLED, length, system].append(key)
    if len({t for t, _, _ in groups}) == 2:  # one task: its pooled rows repeat it
        groups = {label: keys for label, keys in groups.items() if label[0] != POOLED}
    order = sorted(groups, key=lambda g: (g[1], g[0] == POOLED, g[0], g[2]))
    header = [
        "task", "length", "setting", "examples", "full correct", "setting correct", "of full",
        "95% interval", "blocks read / step", f"full attention ms (batch {batch})", "setting attention ms",
        "setting / full",
    ]  # fmt: skip
    return markdown_table(header, [_row(label, groups[label], answers, medians, batch) for label in order])


def summarize_file(path: Path, tasks: list[str] | None = None, lengths: list[int] | None = None) -> str:
    """The table over every example the JSONL holds (runs split by `--first-example` or resumed included)."""
    answers, medians = load_results(path)
    return summary_table(answers, medians, tasks, lengths)
