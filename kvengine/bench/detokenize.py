"""`kvengine bench detokenize`: what streaming costs per token as the output grows.

Feeds a real output (prose, tokenized by the model's tokenizer, `--tokens` long)
token by token to the server's `TextStream` (incremental: tokenizers'
`DecodeStream`), and to the naive stream a server would otherwise run (decode
the whole output again at every token), in the same run, alternating. Reports
the median cost per token in windows along the output: flat for the first,
growing with the output for the second. No model forward runs here; only
the tokenizer is loaded.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from kvengine.engine.generate import TextStream
from kvengine.results import make_row, markdown_table

WINDOW = 64  # tokens per measured window


def _positions(num_tokens: int) -> list[int]:
    """Window starts: the beginning, then every doubling, up to the end."""
    starts, at = [0], 256
    while at + WINDOW <= num_tokens:
        starts.append(at)
        at *= 2
    if starts[-1] + WINDOW < num_tokens:
        starts.append(num_tokens - WINDOW)
    return starts


def _naive_cost(tokenizer: Any, ids: list[int], start: int) -> float:
    """Seconds per token of re-decoding the whole output, over tokens start..start+WINDOW."""
    t0 = time.perf_counter()
    for n in range(start + 1, start + WINDOW + 1):
        tokenizer.decode(ids[:n], skip_special_tokens=True)
    return (time.perf_counter() - t0) / WINDOW


def _incremental_costs(tokenizer: Any, ids: list[int], starts: list[int]) -> dict[int, float]:
    """Seconds per token of `TextStream.update` in each window, fed the whole output in order."""
    stream, costs, t0 = TextStream(tokenizer), {}, 0.0
    ends, begins = {s + WINDOW: s for s in starts}, set(starts)
    out: list[int] = []  # grows as a request's output does (the server passes its own list)
    for n, token in enumerate(ids, start=1):
        out.append(token)
        if n - 1 in begins:
            t0 = time.perf_counter()
        stream.update(out, final=False)
        if n in ends:
            costs[ends[n]] = (time.perf_counter() - t0) / WINDOW
    return costs


def output_ids(tokenizer: Any, num_tokens: int) -> list[int]:
    """`num_tokens` ids of prose (the eval haystack's), as a model's output would be."""
    from kvengine.eval.tasks.haystack import prose

    words = num_tokens  # about 1.3 tokens per word: enough words for the tokens
    ids: list[int] = list(tokenizer.encode(" ".join(prose(words, 0)), add_special_tokens=False))
    while len(ids) < num_tokens:
        words *= 2
        ids = list(tokenizer.encode(" ".join(prose(words, 0)), add_special_tokens=False))
    return ids[:num_tokens]


def run(tokenizer: Any, num_tokens: int, repeats: int) -> list[dict[str, Any]]:
    """Rows: median microseconds per token per window start, for both streams."""
    ids = output_ids(tokenizer, num_tokens)
    starts = _positions(num_tokens)
    inc: dict[int, list[float]] = {s: [] for s in starts}
    naive: dict[int, list[float]] = {s: [] for s in starts}
    for _ in range(repeats):  # alternating: one incremental pass, then the naive windows
        for s, cost in _incremental_costs(tokenizer, ids, starts).items():
            inc[s].append(cost)
        for s in starts:
            naive[s].append(_naive_cost(tokenizer, ids, s))
    rows = []
    for name, costs in (("incremental", inc), ("redecode", naive)):
        for s in starts:
            us = 1e6 * statistics.median(costs[s])
            rows.append(
                make_row("detokenize", "us_per_token", us, "us", stream=name, position=s, tokens=num_tokens)
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of `run`'s rows: one line per window, both streams side by side."""
    by = {(r["config"]["stream"], r["config"]["position"]): r["value"] for r in rows}
    starts = sorted({r["config"]["position"] for r in rows})
    return markdown_table(
        ["tokens into the output", "incremental (us/token)", "re-decode all (us/token)"],
        [(f"{s}-{s + WINDOW}", f"{by['incremental', s]:.1f}", f"{by['redecode', s]:.1f}") for s in starts],
    )
