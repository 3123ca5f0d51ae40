"""`kvengine report`: a Markdown report and PNG plots from the JSON rows of `kvengine eval`.

The table has one line per task x press x ratio x KIVI width (and an "all"
line per setting, averaged over all its rows): accuracy, KV bytes held (measured in
the pool, as a fraction of the uncompressed cache and in MiB) and seconds per
example; then accuracy by context length when the rows span several. The
plots (`kvengine.eval.plots`): accuracy vs. KV bytes held, and, when the needle
task ran at several lengths or depths, the needle grid.

Rows of a baseline engine (`engine: "kvpress"`, from `kvengine eval --baseline
kvpress`) stay out of those; they get a side-by-side section
(`kvengine.eval.compare`) and dashed curves in the accuracy plot.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvengine.eval.compare import compare_table, time_tables
from kvengine.eval.plots import plot_accuracy_vs_bytes, plot_needle_grid
from kvengine.eval.summary import (
    Setting,
    Summary,
    engine_of,
    label,
    load_rows,
    needle_grid,
    setting_of,
    summarize,
)
from kvengine.results import markdown_table


def _ratio(ratio: float) -> str:
    """Two decimals, four where two would round (ratios planned from byte budgets)."""
    return f"{ratio:.2f}" if round(ratio, 2) == ratio else f"{ratio:.4f}"


def _of_full(summaries: list[Summary]) -> dict[str, float]:
    """Each task's accuracy with the full cache (press none, no KIVI), where it ran."""
    return {s.task: s.accuracy for s in summaries if s.setting == ("none", 0.0, 0)}


def summary_table(summaries: list[Summary]) -> str:
    """One line per task x setting; "of full" is accuracy over the same task's full-cache accuracy."""
    full = _of_full(summaries)
    header = [
        "task",
        "press",
        "ratio",
        "KIVI bits",
        "examples",
        "accuracy",
        "of full",
        "KV bytes / full",
        "KV bytes / 16-bit",
        "KV MiB",
        "s / example",
        "blocks read / step",
    ]
    lines = [
        [
            s.task,
            s.setting[0],
            _ratio(s.setting[1]),
            s.setting[2] or "-",
            s.num_examples,
            f"{s.accuracy:.3f}",
            f"{s.accuracy / full[s.task]:.2f}" if full.get(s.task) else "-",
            f"{s.kv_fraction:.3f}",
            "-" if s.kv_fraction_16bit is None else f"{s.kv_fraction_16bit:.3f}",
            f"{s.kv_mib:.2f}",
            f"{s.seconds:.2f}",
            "-" if s.blocks_read is None else f"{s.blocks_read:.3f}",
        ]
        for s in summaries
    ]
    return markdown_table(header, lines)


def length_table(rows: Iterable[dict[str, Any]], engine: str = "kvengine") -> str:
    """Markdown: mean accuracy of every setting (all tasks together) per context length, one column each.

    Empty when the rows have a single length (the summary table says it all).
    """
    cells: dict[Setting, dict[int, list[float]]] = {}
    for r in rows:
        if engine_of(r) == engine:
            cells.setdefault(setting_of(r), {}).setdefault(int(r["config"]["length"]), []).append(r["value"])
    lengths = sorted({n for by_length in cells.values() for n in by_length})
    if len(lengths) < 2:
        return ""
    order = sorted(cells, key=lambda s: (s[0] != "none" or s[2] != 0, s[2], s[0], s[1]))
    lines = [
        [
            label(s),
            f"{s[1]:.2f}",
            *(f"{statistics.mean(cells[s][n]):.3f}" if n in cells[s] else "-" for n in lengths),
        ]
        for s in order
    ]
    return markdown_table(["press", "ratio", *(f"accuracy @{n}" for n in lengths)], lines)


def by_length_section(rows: list[dict[str, Any]]) -> str:
    """Accuracy per context length, all tasks together (empty with a single length)."""
    table = length_table(rows)
    if not table:
        return ""
    return "## Accuracy by context length\n\nkvengine's rows, every task together.\n\n" + table + "\n\n"


def budget_section(summaries: list[Summary], rows: list[dict[str, Any]]) -> str:
    """Per byte budget the runs planned for (`kv_budget_16bit`), every task x setting that held at most it.

    A setting fits a budget when its mean bytes held over the 16-bit cache is
    at most the budget, whatever it was planned for (a KIVI width alone may
    fit). Empty when no row was planned for a budget.
    """
    budgets = sorted({float(r["kv_budget_16bit"]) for r in rows if r.get("kv_budget_16bit")}, reverse=True)
    if not budgets:
        return ""
    full = _of_full(summaries)
    lines = [
        [
            f"{budget:g}",
            s.task,
            label(s.setting),
            _ratio(s.setting[1]),
            s.num_examples,
            f"{s.kv_fraction_16bit:.3f}",
            f"{s.accuracy:.3f}",
            f"{s.accuracy / full[s.task]:.2f}" if full.get(s.task) else "-",
        ]
        for budget in budgets
        for s in summaries
        if s.kv_fraction_16bit is not None and s.kv_fraction_16bit <= budget
    ]
    table = markdown_table(
        ["budget", "task", "setting", "ratio", "examples", "KV bytes / 16-bit", "accuracy", "of full"], lines
    )
    return (
        "## Within each byte budget\n\nEvery task x setting whose mean bytes held are at most the budget, as "
        "a fraction of the 16-bit cache of the same tokens; of full: accuracy over the full cache's.\n\n"
        + table
        + "\n\n"
    )


def compare_section(rows: list[dict[str, Any]]) -> str:
    """The kvengine vs kvpress section of the report (empty without kvpress rows)."""
    table = compare_table(rows)
    if not table:
        return ""
    return (
        "## kvengine vs kvpress\n\nThe same examples (same token ids, greedy, same answer length) through "
        "kvpress's own pipeline, over the examples both engines ran, all tasks together. Seconds per example: "
        "wall time from the context's token ids to every answer decoded, on each engine, measured in the "
        "same run one after the other. KV bytes: what each engine's cache holds after compression (kvpress's "
        "AdaKV masks evicted entries, so it holds them all).\n\n"
        + table
        + "\n\n### Time by context length\n\n"
        + time_tables(rows)
        + "\n\n"
    )


def write_report(results: Path, out_dir: Path) -> list[Path]:
    """Write `eval_report.md` and the PNG plots for `results` into `out_dir`; returns the files written."""
    rows = load_rows(results)
    summaries, baseline = summarize(rows), summarize(rows, "kvpress")
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = out_dir / "eval_accuracy_vs_kv_bytes.png"
    plot_accuracy_vs_bytes(summaries, curve, baseline)
    written, images = [curve], [f"![accuracy vs KV bytes]({curve.name})"]
    grid = needle_grid([r for r in rows if engine_of(r) == "kvengine"])
    if grid:
        heatmap = out_dir / "eval_needle_grid.png"
        plot_needle_grid(grid, heatmap)
        written.append(heatmap)
        images.append(f"![needle grid]({heatmap.name})")
    models = sorted({str(r["config"].get("model")) for r in rows})
    report = out_dir / "eval_report.md"
    report.write_text(
        f"# Evaluation: {results.name}\n\nModel {', '.join(models)}; {len(rows)} result rows. "
        "accuracy: mean fraction of each question's answers found in the output; of full: over the same task's "
        "full-cache accuracy. KV bytes: held in the pool after compression, over the uncompressed cache in the "
        "pool's dtype (/ full) and over the 16-bit cache of the same tokens (/ 16-bit). s / example: prefill + compression + all "
        "answers.\n\n"
        + summary_table(summaries)
        + "\n\n"
        + budget_section(summaries, rows)
        + by_length_section(rows)
        + compare_section(rows)
        + "\n\n".join(images)
        + "\n",
        encoding="utf-8",
    )
    return [report, *written]
