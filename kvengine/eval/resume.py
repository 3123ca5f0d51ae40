"""Resuming `kvengine eval`: the key of a result row, and the keys a results file already holds.

A row's key is (engine, model, seed, task, length, example, depth, press,
ratio, kivi): the runner skips every key already in its output file, so an
interrupted run resumes where it stopped and never counts a row of another
model, seed, engine or depth as done. This module reads rows; the runner
writes them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# (engine, model, seed, task, length, example, depth, press, ratio, kivi). The depth is part of it because
# example i of a run with another number of examples sits at another depth: it is another example.
Key = tuple[str, str, int, str, int, int, float | None, str, float, int]
KEY_FIELDS = ("engine", "model", "seed", "task", "length", "example", "depth", "press", "ratio", "kivi")


def row_key(row: Mapping[str, Any]) -> Key:
    """The key of a result row (its `config` fields; rows written before engines were named are kvengine's)."""
    c = row["config"]
    depth = c.get("depth")
    return (
        str(c.get("engine", "kvengine")),
        str(c["model"]),
        int(c["seed"]),
        str(c["task"]),
        int(c["length"]),
        int(c["example"]),
        None if depth is None else float(depth),
        str(c["press"]),
        float(c["ratio"]),
        int(c["kivi"]),
    )


def done_keys(path: Path) -> set[Key]:
    """Keys of the rows already in `path` (none if it does not exist).

    A last line cut short by an interrupted write is dropped, and the file is
    made to end with a newline, so appended rows stay one per line.
    """
    if not path.exists():
        return set()
    text = path.read_text(encoding="utf-8")
    keys: set[Key] = set()
    for line in text.splitlines():
        try:
            row = json.loads(line)
            keys.add(row_key(row))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a torn line, or a row of another benchmark
    if text and not text.endswith("\n"):
        with path.open("a", encoding="utf-8") as f:
            f.write("\n")
    return keys
