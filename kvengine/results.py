"""JSON rows and Markdown tables for benchmark results.

A row is one measured number with everything needed to read it later:
metric, value, unit, configuration, machine and library versions.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers


def machine_info() -> dict[str, Any]:
    """CPU model, core count and torch threads of this machine."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def versions() -> dict[str, str]:
    from kvengine import __version__

    return {"kvengine": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def make_row(bench: str, metric: str, value: float, unit: str, **config: Any) -> dict[str, Any]:
    return {
        "bench": bench,
        "metric": metric,
        "value": value,
        "unit": unit,
        "config": config,
        "machine": machine_info(),
        "versions": versions(),
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def append_rows(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows as JSON lines (the file and its folder are created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_report(path: Path, title: str, command: str, body: str, notes: str = "") -> None:
    """Append a dated section (command, machine, versions, body) to a Markdown report."""
    info, ver = machine_info(), versions()
    section = [
        f"\n## {title}\n",
        f"- date: {dt.date.today().isoformat()}",
        f"- command: `{command}`",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch threads {info['torch_threads']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in ver.items()),
        "",
        body,
    ]
    if notes:
        section += ["", notes]
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text("# Benchmarks\n\nMeasured results, newest last, failures and shortfalls included.\n")
    with path.open("a", encoding="utf-8") as f:
        f.write("\n".join(section) + "\n")
