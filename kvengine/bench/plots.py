"""`kvengine report`: a Markdown table and PNG plots from the JSON rows of `kvengine eval`.

The table has one line per task x press x ratio x KIVI width (and an "all"
line per setting, averaged over all its rows): accuracy, KV bytes held (measured in
the pool, as a fraction of the uncompressed cache and in MiB) and seconds per
example. The plots: accuracy vs. KV bytes held, one curve per press (the curve
users compare), and, when the needle task ran at several lengths or depths,
the needle grid (depth x length) as a heatmap per setting.

Rows of a baseline engine (`engine: "kvpress"`, from `kvengine eval --baseline
kvpress`) stay out of those; they get a side-by-side table (`compare_table`)
and dashed curves in the accuracy plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvengine.bench.eval_kvengine import row_seconds
from kvengine.bench.kvpress_baseline import compare_table, time_tables
from kvengine.bench.report import markdown_table
from kvengine.errors import InvalidRequestError

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


def _setting(row: dict[str, Any]) -> Setting:
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


def _summary(task: str, setting: Setting, rows: list[dict[str, Any]]) -> Summary:
    return Summary(
        task,
        setting,
        len(rows),
        statistics.mean(r["value"] for r in rows),
        statistics.mean(r["kv_bytes"] / r["kv_bytes_full"] for r in rows),
        statistics.mean(r["kv_bytes"] for r in rows) / 2**20,
        statistics.mean(row_seconds(r) for r in rows),
    )


def summarize(rows: Iterable[dict[str, Any]], engine: str = "kvengine") -> list[Summary]:
    """One summary per (task, setting) of `engine`'s rows, then one per setting over all tasks ("all"), sorted."""
    groups: dict[tuple[str, Setting], list[dict[str, Any]]] = {}
    for r in rows:
        if engine_of(r) != engine:
            continue
        for task in (r["config"]["task"], "all"):
            groups.setdefault((task, _setting(r)), []).append(r)
    order = sorted(groups, key=lambda k: (k[0] == "all", k[0], k[1][0] != "none", k[1][0], k[1][2], k[1][1]))
    return [_summary(task, setting, groups[task, setting]) for task, setting in order]


def summary_table(summaries: list[Summary]) -> str:
    header = [
        "task",
        "press",
        "ratio",
        "KIVI bits",
        "examples",
        "accuracy",
        "KV bytes / full",
        "KV MiB",
        "s / example",
    ]
    lines = [
        [
            s.task,
            s.setting[0],
            f"{s.setting[1]:.2f}",
            s.setting[2] or "-",
            s.num_examples,
            f"{s.accuracy:.3f}",
            f"{s.kv_fraction:.3f}",
            f"{s.kv_mib:.2f}",
            f"{s.seconds:.2f}",
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
            cells.setdefault(_setting(r), {}).setdefault(int(r["config"]["length"]), []).append(r["value"])
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


def plot_accuracy_vs_bytes(
    summaries: list[Summary], path: Path, baseline: list[Summary] | None = None
) -> None:
    """Accuracy over all rows (every task) vs. KV bytes held (fraction of full), one curve per press (ratios joined).

    `baseline` (kvpress's summaries) adds a dashed curve per press, in the color of kvengine's.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5 if baseline else 7, 4.5))
    names = sorted({label(s.setting) for s in [*summaries, *(baseline or [])] if s.task == "all"})
    # tab20 holds 10 hues in a dark and a light shade: the dark ones first, so curves differ by hue.
    palette = plt.get_cmap("tab20")
    colors = {name: palette((2 * i) % 20 + (2 * i) // 20 % 2) for i, name in enumerate(names)}
    for engine, group in (("", summaries), (" (kvpress)", baseline or [])):
        curves: dict[str, list[Summary]] = {}
        for s in group:
            if s.task == "all":
                curves.setdefault(label(s.setting), []).append(s)
        for name, points in sorted(curves.items()):
            points.sort(key=lambda s: s.kv_fraction)
            style = ("x" if engine else "*") if len(points) == 1 else ("x--" if engine else "o-")
            xs, ys = [p.kv_fraction for p in points], [p.accuracy for p in points]
            ax.plot(xs, ys, style, label=name + engine, markersize=6, color=colors[name])
    ax.set_xlabel("KV bytes held / uncompressed (measured in the pool)")
    ax.set_ylabel("accuracy (mean over all rows)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    if baseline:  # twice the curves: the legend goes beside the axes, not over them
        ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def needle_grid(rows: Iterable[dict[str, Any]]) -> dict[Setting, dict[tuple[float, int], float]]:
    """Mean score of the needle task per setting and (depth, length); empty unless it spans a grid."""
    cells: dict[Setting, dict[tuple[float, int], list[float]]] = {}
    for r in rows:
        c = r["config"]
        if c["task"] == GRID_TASK and c.get("depth") is not None:
            cell = (round(float(c["depth"]), 3), int(c["length"]))
            cells.setdefault(_setting(r), {}).setdefault(cell, []).append(r["value"])
    points = {cell for by_cell in cells.values() for cell in by_cell}
    if len({d for d, _ in points}) < 2 and len({n for _, n in points}) < 2:
        return {}
    return {s: {cell: statistics.mean(v) for cell, v in by_cell.items()} for s, by_cell in cells.items()}


def plot_needle_grid(grid: dict[Setting, dict[tuple[float, int], float]], path: Path) -> None:
    """One heatmap per setting: needle depth (rows) x context length (columns), color = accuracy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = sorted({d for cells in grid.values() for d, _ in cells})
    lengths = sorted({n for cells in grid.values() for _, n in cells})
    settings = sorted(grid, key=lambda s: (s[0] != "none", s[0], s[2], s[1]))
    ncols = min(4, len(settings))
    nrows = -(-len(settings) // ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 2.8 * nrows), squeeze=False, layout="constrained"
    )
    for ax, setting in zip(axes.flat, settings, strict=False):
        cells = grid[setting]
        values = [[cells.get((d, n), float("nan")) for n in lengths] for d in depths]
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_title(
            f"{label(setting)} @ {setting[1]:.2f}" if setting[0] != "none" else label(setting), fontsize=8
        )
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths], fontsize=7)
        ax.set_xlabel("context tokens", fontsize=7)
        ax.set_ylabel("needle depth", fontsize=7)
    for ax in axes.flat[len(settings) :]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=0.8, label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def by_length_section(rows: list[dict[str, Any]]) -> str:
    """Accuracy per context length, all tasks together (empty with a single length)."""
    table = length_table(rows)
    if not table:
        return ""
    return "## Accuracy by context length\n\nkvengine's rows, every task together.\n\n" + table + "\n\n"


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
        "accuracy: mean fraction of each question's answers found in the output. KV bytes: held in the pool "
        "after compression, over the uncompressed fp cache. s / example: prefill + compression + all "
        "answers.\n\n"
        + summary_table(summaries)
        + "\n\n"
        + by_length_section(rows)
        + compare_section(rows)
        + "\n\n".join(images)
        + "\n",
        encoding="utf-8",
    )
    return [report, *written]


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """`kvengine report RESULTS.jsonl [--out-dir DIR]`."""
    rep = sub.add_parser(
        "report",
        help="Markdown table and PNG plots from `kvengine eval` results",
        description="Regenerate the table (task x press x ratio: accuracy, KV bytes held, time) and the plots "
        "(accuracy vs KV bytes per press; needle grid heatmap when present) from eval's JSON rows.",
    )
    rep.add_argument("results", help="JSONL file written by `kvengine eval`")
    rep.add_argument("--out-dir", default="docs", help="where eval_report.md and the PNGs go (default: docs)")


def run_report_command(args: argparse.Namespace) -> None:
    for path in write_report(Path(args.results), Path(args.out_dir)):
        print(path)
