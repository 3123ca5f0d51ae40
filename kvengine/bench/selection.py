"""`kvengine bench selection`: decode attention time per step with query-aware block selection vs full.

One `needle_hard` context per length is prefilled once (its queries kept),
on a pool that tracks per-block key bounds. Then one decode step's
attention (`attention._decode`, every layer, the query of the context's last
token, `batch` copies of the sequence in the decode batch) is timed with and
without selection, alternating the two within each repeat so that both see
the same load; medians are reported, with the selection's own cost (ranking
blocks and building the smaller slot table) and the blocks read. Same
kernel or SDPA fallback for both, whichever the engine uses.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.attention import ForwardContext, SeqSpan, _decode, decode_batch
from kvengine.engine.engine import Engine
from kvengine.engine.generate import encode_prompt
from kvengine.engine.selection import BlockSelection, SelectionStats, select_blocks
from kvengine.eval.presses import prefill_context
from kvengine.eval.tasks import make_example
from kvengine.models import LoadedModel, load
from kvengine.press.methods import make_method
from kvengine.results import append_report, append_rows, make_row, markdown_table


def _step_times(
    engine: Engine, ctx: ForwardContext, queries: dict[int, torch.Tensor], scale: float
) -> tuple[float, float]:
    """Seconds of one decode step's attention over every layer, and of the selection alone in it."""
    assert ctx.decode is not None
    total = select = 0.0
    sel, bounds = ctx.selection, engine.pool.key_bounds
    for layer, q in queries.items():
        start = time.perf_counter()
        _decode(ctx, ctx.decode, layer, q, scale, None)
        total += time.perf_counter() - start
        if sel is not None and bounds is not None:
            start = time.perf_counter()
            select_blocks(
                sel, bounds, q, ctx.decode.slots[layer], ctx.decode.lens[layer], engine.pool.zero_slot
            )
            select += time.perf_counter() - start
    return total, select


def measure_length(
    model: LoadedModel, length: int, selection: BlockSelection, batch: int, repeats: int
) -> dict[str, float]:
    """Median attention seconds per decode step, full and selected, at one context length."""
    assert model.tokenizer is not None
    example = make_example("needle_hard", model.tokenizer, length, seed=0, depth=0.5)
    ids, _ = encode_prompt(model, example.context, None, None, example.questions[0].text)
    engine = Engine(model, CacheConfig(), SchedulerConfig(max_num_seqs=4, max_step_tokens=len(ids)))
    engine.runner.select_blocks(selection)
    context, _ = prefill_context(engine, ids, keep_queries=True)
    seq = engine.sequences[context]
    assert seq.kv is not None
    spans = [SeqSpan(i, i + 1, seq.kv, seq.kv.max_len) for i in range(batch)]
    queries = {layer: q[:, -1].expand(batch, -1, -1).contiguous() for layer, q in seq.queries.items()}
    scale = engine.runner._scaling
    pool = engine.pool
    contexts = {
        name: ForwardContext(
            pool, spans, torch.empty(0), decode_batch(spans, pool.zero_slot, False), engine.runner._kernel,
            sel, SelectionStats(),
        )
        for name, sel in (("full", None), ("selected", selection))
    }  # fmt: skip
    times: dict[str, list[float]] = {"full": [], "selected": [], "selection_only": []}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, ctx in contexts.items():
                total, select = _step_times(engine, ctx, queries, scale)
                times[name].append(total)
                if name == "selected":
                    times["selection_only"].append(select)
    stats = contexts["selected"].selection_stats
    assert stats is not None
    out = {name: statistics.median(values) for name, values in times.items()}
    out["blocks_read"] = stats.read_fraction
    out["num_tokens"] = len(ids)
    return out


def run_selection_bench(
    model_name: str,
    lengths: list[int],
    ratio: float,
    batch: int,
    repeats: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench selection",
) -> list[dict[str, Any]]:
    """Time every length; append JSON rows to `out` and a table to `report`."""
    selection = make_method("quest", ratio).selection
    model = load(model_name)
    rows, table = [], []
    for length in lengths:
        m = measure_length(model, length, selection, batch, repeats)
        cfg = dict(method="quest", ratio=ratio, length=length, batch=batch, repeats=repeats)
        rows += [
            make_row("selection", "attention_s_per_step", m["full"], "s", system="full", **cfg),
            make_row("selection", "attention_s_per_step", m["selected"], "s", system="quest", **cfg),
            make_row("selection", "selection_s_per_step", m["selection_only"], "s", system="quest", **cfg),
            make_row(
                "selection", "blocks_read_fraction", m["blocks_read"], "fraction", system="quest", **cfg
            ),
        ]
        table.append([
            length, int(m["num_tokens"]), f"{1000 * m['full']:.2f}", f"{1000 * m['selected']:.2f}",
            f"{m['selected'] / m['full']:.2f}", f"{1000 * m['selection_only']:.2f}", f"{m['blocks_read']:.3f}",
        ])  # fmt: skip
    append_rows(out, rows)
    header = ["length", "tokens", "full ms/step", "quest ms/step", "quest / full", "of which selection ms",
              "blocks read"]  # fmt: skip
    body = markdown_table(header, table)
    print(body)
    append_report(
        report,
        "Query-aware block selection: decode attention time per step",
        command,
        body,
        f"Model {model.name} ({model.dtype}), one needle_hard context per length, {batch} decoding copies of it, "
        f"quest at ratio {ratio} (reads {1 - ratio:.3f} of each cell's blocks, sinks and recent included). "
        "Attention of one decode step summed over all layers (the engine's decode path, kernel or SDPA "
        f"fallback as the engine picks), full and selected alternating within each of {repeats} repeats, "
        "medians. The machine is shared with other agents while this runs.",
    )
    return rows
