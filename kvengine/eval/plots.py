"""The PNG plots of `kvengine report`: accuracy vs KV bytes held, and the needle grid.

The accuracy plot has one curve per press (its ratios joined), the curve
users compare; a baseline engine's summaries (kvpress) add dashed curves in
the same colors. The needle grid is a heatmap per setting of needle depth x
context length. Needs matplotlib (the `plots` extra); files only, no display.
"""

from __future__ import annotations

from pathlib import Path

from kvengine.eval.summary import Setting, Summary, label


def plot_accuracy_vs_bytes(
    summaries: list[Summary], path: Path, baseline: list[Summary] | None = None
) -> None:
    """Accuracy over all rows (every task) vs. KV bytes held (of the 16-bit cache), one curve per press (ratios joined).

    `baseline` (kvpress's summaries) adds a dashed curve per press, in the color of kvengine's.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5 if baseline else 7, 4.5))
    # The 16-bit cache is the budgets' unit; rows written before it was recorded fall back to the pool's.
    of_16bit = all(s.kv_fraction_16bit is not None for s in [*summaries, *(baseline or [])])

    def x(s: Summary) -> float:
        return s.kv_fraction_16bit if of_16bit and s.kv_fraction_16bit is not None else s.kv_fraction

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
            points.sort(key=x)
            style = ("x" if engine else "*") if len(points) == 1 else ("x--" if engine else "o-")
            xs, ys = [x(p) for p in points], [p.accuracy for p in points]
            ax.plot(xs, ys, style, label=name + engine, markersize=6, color=colors[name])
    unit = "the 16-bit cache" if of_16bit else "uncompressed"
    ax.set_xlabel(f"KV bytes held / {unit} (measured in the pool)")
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
