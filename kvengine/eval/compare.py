"""kvengine next to kvpress: the side-by-side tables of `kvengine report` from rows of both engines.

Rows of the two engines pair up when they answer the same example under the
same setting (`paired_rows`); only such pairs are compared, so both columns
average over the same questions. This module reads rows; it runs nothing
(`kvpress_client` drives the kvpress worker, `runner` writes the rows).
"""

from __future__ import annotations

import statistics
from typing import Any

from kvengine.eval.measure import row_seconds
from kvengine.results import markdown_table

Pair = tuple[dict[str, Any], dict[str, Any]]  # (kvengine's row, kvpress's row) of one example and setting


def _pair_key(row: dict[str, Any]) -> tuple[Any, ...]:
    c = row["config"]
    return (
        c.get("model"),
        c.get("seed"),
        c["task"],
        c["length"],
        c["example"],
        c["press"],
        float(c["ratio"]),
        c["kivi"],
    )


def paired_rows(
    rows: list[dict[str, Any]],
) -> dict[tuple[str, float], list[Pair]]:
    """(kvengine row, kvpress row) pairs of the same example and setting, by (press, ratio).

    Only examples both engines answered count, so the two columns of the
    comparison average over the same questions.
    """
    ours = {_pair_key(r): r for r in rows if r["config"].get("engine", "kvengine") == "kvengine"}
    pairs: dict[tuple[str, float], list[Pair]] = {}
    for r in rows:
        if r["config"].get("engine") == "kvpress" and _pair_key(r) in ours:
            key = (str(r["config"]["press"]), float(r["config"]["ratio"]))
            pairs.setdefault(key, []).append((ours[_pair_key(r)], r))
    return pairs


def _compared(pairs: list[Pair]) -> list[str]:
    """The formatted columns of one press x ratio: accuracies, answers alike, KV fractions, seconds."""

    def mean(values: list[float]) -> float:
        return sum(values) / len(values)

    same = [a == b for ours, theirs in pairs for a, b in zip(ours["outputs"], theirs["outputs"], strict=True)]
    t_ours, t_theirs = mean([row_seconds(a) for a, _ in pairs]), mean([row_seconds(b) for _, b in pairs])
    return [
        f"{mean([a['value'] for a, _ in pairs]):.3f}",
        f"{mean([b['value'] for _, b in pairs]):.3f}",
        f"{mean([float(x) for x in same]):.2f}",
        f"{mean([a['kv_bytes'] / a['kv_bytes_full'] for a, _ in pairs]):.3f}",
        f"{mean([b['kv_bytes'] / b['kv_bytes_full'] for _, b in pairs]):.3f}",
        f"{t_ours:.2f}",
        f"{t_theirs:.2f}",
        f"{t_theirs / t_ours:.2f}",
    ]


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per press x ratio, both engines' accuracy, answers alike, KV bytes and seconds per example.

    Empty when no row has a kvpress twin. "same answers" is the fraction of
    questions whose answer text is identical on both engines.
    """
    pairs = paired_rows(rows)
    order = sorted(pairs, key=lambda k: (k[0] != "none", k[0], k[1]))
    lines = [
        [press, f"{ratio:.2f}", len(pairs[press, ratio]), *_compared(pairs[press, ratio])]
        for press, ratio in order
    ]
    if not lines:
        return ""
    header = [
        "press", "ratio", "examples", "accuracy kvengine", "accuracy kvpress", "same answers",
        "KV bytes / full kvengine", "KV bytes / full kvpress", "s / example kvengine", "s / example kvpress",
        "kvpress / kvengine time",
    ]  # fmt: skip
    return markdown_table(header, lines)


def _example_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return _pair_key(row)[:5]  # (model, seed, task, length, example)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}"


def _per_setting_line(length: int, group: list[Pair]) -> list[Any]:
    """Each setting as one request runs it, from its own prefill: medians over the pairs."""
    return [
        length,
        len(group),
        _median([a["prefill_s"] for a, _ in group]),
        _median([a["compress_s"] for a, _ in group]),
        _median([a["answer_s"] for a, _ in group]),
        _median([b["prefill_s"] for _, b in group]),
        _median([b["answer_s"] for _, b in group]),
        _median([row_seconds(a) for a, _ in group]),
        _median([row_seconds(b) for _, b in group]),
        _median([row_seconds(b) / row_seconds(a) for a, b in group]),
    ]


def _per_example_line(length: int, group: list[Pair]) -> list[Any]:
    """All shared settings of an example, as `kvengine eval` runs them: means over examples.

    kvengine's seconds count each distinct prefill of the example once (the
    settings share it; a resumed example that prefilled twice pays twice).
    """
    examples: dict[tuple[Any, ...], list[Pair]] = {}
    for a, b in group:
        examples.setdefault(_example_key(a), []).append((a, b))
    ours_s = [
        sum({a["prefill_s"] for a, _ in ex}) + sum(a["compress_s"] + a["answer_s"] for a, _ in ex)
        for ex in examples.values()
    ]
    theirs_s = [sum(row_seconds(b) for _, b in ex) for ex in examples.values()]
    return [
        length,
        len(examples),
        f"{len(group) / len(examples):.1f}",
        f"{sum(ours_s) / len(ours_s):.1f}",
        f"{sum(theirs_s) / len(theirs_s):.1f}",
        f"{sum(theirs_s) / sum(ours_s):.2f}",
    ]


_SETTING_HEADER = [
    "context tokens", "pairs", "prefill kvengine", "compression kvengine", "answers kvengine",
    "prefill + compression kvpress", "answers kvpress", "s / setting kvengine", "s / setting kvpress",
    "kvpress / kvengine time",
]  # fmt: skip
_EXAMPLE_HEADER = [
    "context tokens", "examples", "settings per example", "s / example (all settings) kvengine",
    "s / example (all settings) kvpress",
    "kvpress / kvengine time",
]  # fmt: skip


def time_tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: both engines' seconds by context length, two ways, over the (example, setting) pairs both ran.

    Per setting: each setting as one request would run it, from the context's
    ids (kvengine's row carries the whole prefill it shares), medians over the
    pairs, with the median of the per-pair ratios. Per example: every shared
    setting of one example, as `kvengine eval` runs them: kvengine prefills a
    context once (each distinct prefill counted once, so a resumed example that
    prefilled twice pays twice) and compresses a copy per setting; kvpress
    prefills under each press. Empty when no row has a kvpress twin.
    """
    by_length: dict[int, list[Pair]] = {}
    for group in paired_rows(rows).values():
        for ours, theirs in group:
            by_length.setdefault(int(ours["config"]["length"]), []).append((ours, theirs))
    if not by_length:
        return ""
    lengths = sorted(by_length.items())
    return (
        "Per setting (each from its own prefill, as one request runs; medians over the pairs, and the median "
        "of the per-pair ratios):\n\n"
        + markdown_table(_SETTING_HEADER, [_per_setting_line(n, group) for n, group in lengths])
        + "\n\nPer example (all of an example's shared settings, as `kvengine eval` runs them: kvengine "
        "prefills the context once and compresses a copy per setting, kvpress prefills under each press; "
        "means over examples):\n\n"
        + markdown_table(_EXAMPLE_HEADER, [_per_example_line(n, g) for n, g in lengths])
    )
