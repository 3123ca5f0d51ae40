"""The rows of `kvengine eval` read back: loaded, grouped by setting and summarized.

A setting is (press, ratio, KIVI bits). A `Summary` is one task x setting
of one engine (and an "all" line per setting over every task): accuracy, KV
bytes held (measured in the pool, as a fraction of the uncompressed cache, of
the 16-bit cache of the same tokens, and in MiB) and seconds per example. `needle_grid` is the needle task's mean
score per depth and length. Rows of a baseline engine (`engine: "kvpress"`)
are summarized only when asked for. Nothing here renders: `report` writes
tables, `plots` draws.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.eval.measure import row_seconds

GRID_TASK = "niah_single"
Setting = tuple[str, float, int]  # (press, ratio, kivi)


def load_rows(path: Path) -> list[dict[str, Any]]:
    """The `kvengine eval` rows of a JSONL file; other benchmarks' rows and a torn last line are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequestError(f"cannot read results {path}: {exc.strerror}") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # an interrupted write
            raise InvalidRequestError(f"{path}:{number}: not valid JSON") from None
        if isinstance(row, dict) and row.get("bench") == "eval":
            rows.append(row)
    if not rows:
        raise InvalidRequestError(f"{path} holds no `kvengine eval` rows")
    return rows


def engine_of(row: dict[str, Any]) -> str:
    """The engine that made a row ("kvengine" for rows written before engines were named)."""
    return str(row["config"].get("engine", "kvengine"))


def setting_of(row: dict[str, Any]) -> Setting:
    """(press, ratio, KIVI bits) of a row."""
    c = row["config"]
    return (str(c["press"]), float(c["ratio"]), int(c["kivi"]))


def label(setting: Setting) -> str:
    """How a setting is named in tables and legends: "snapkv", "none", "kivi-2", "snapkv+kivi-2"."""
    press, _, kivi = setting
    if not kivi:
        return press
    return f"kivi-{kivi}" if press == "none" else f"{press}+kivi-{kivi}"


@dataclass(frozen=True)
class Summary:
    task: str
    setting: Setting
    num_examples: int
    accuracy: float
    kv_fraction: float  # bytes held / uncompressed bytes, mean over examples
    kv_mib: float
    seconds: float  # prefill + compression + answers, per example
    blocks_read: float | None = None  # blocks read per decode step / held (block selection only)
    kv_fraction_16bit: float | None = (
        None  # bytes held / the 16-bit cache of the same tokens (None: old rows)
    )


def _summary(task: str, setting: Setting, rows: list[dict[str, Any]]) -> Summary:
    read = [r["blocks_read_fraction"] for r in rows if r.get("blocks_read_fraction") is not None]
    of_16bit = [r["kv_fraction_16bit"] for r in rows if r.get("kv_fraction_16bit") is not None]
    return Summary(
        task,
        setting,
        len(rows),
        statistics.mean(r["value"] for r in rows),
        statistics.mean(r["kv_bytes"] / r["kv_bytes_full"] for r in rows),
        statistics.mean(r["kv_bytes"] for r in rows) / 2**20,
        statistics.mean(row_seconds(r) for r in rows),
        statistics.mean(read) if read else None,
        statistics.mean(of_16bit) if len(of_16bit) == len(rows) else None,
    )


def summarize(rows: Iterable[dict[str, Any]], engine: str = "kvengine") -> list[Summary]:
    """One summary per (task, setting) of `engine`'s rows, then one per setting over all tasks ("all"), sorted."""
    groups: dict[tuple[str, Setting], list[dict[str, Any]]] = {}
    for r in rows:
        if engine_of(r) != engine:
            continue
        for task in (r["config"]["task"], "all"):
            groups.setdefault((task, setting_of(r)), []).append(r)
    order = sorted(groups, key=lambda k: (k[0] == "all", k[0], k[1][0] != "none", k[1][0], k[1][2], k[1][1]))
    return [_summary(task, setting, groups[task, setting]) for task, setting in order]


def needle_grid(rows: Iterable[dict[str, Any]]) -> dict[Setting, dict[tuple[float, int], float]]:
    """Mean score of the needle task per setting and (depth, length); empty unless it spans a grid."""
    cells: dict[Setting, dict[tuple[float, int], list[float]]] = {}
    for r in rows:
        c = r["config"]
        if c["task"] == GRID_TASK and c.get("depth") is not None:
            cell = (round(float(c["depth"]), 3), int(c["length"]))
            cells.setdefault(setting_of(r), {}).setdefault(cell, []).append(r["value"])
    points = {cell for by_cell in cells.values() for cell in by_cell}
    if len({d for d, _ in points}) < 2 and len({n for _, n in points}) < 2:
        return {}
    return {s: {cell: statistics.mean(v) for cell, v in by_cell.items()} for s, by_cell in cells.items()}
