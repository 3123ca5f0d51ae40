"""`kvengine bench presses`: needle accuracy, bytes held and compression cost per press.

Each example's context is prefilled once with its queries kept; every press
then compresses its own copy of that cache (`Engine.compress_context`, the
same cache an inline compression gives, tested) and answers the question
from it. KIVI settings prefill their own engine, whose pool stores packed
blocks. Bytes are what the pool holds for the context after compression;
the compression cost is the time of `compress_context` over the prefill
time of the same context.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.generate import encode_prompt
from kvengine.engine.request import SamplingParams
from kvengine.eval.needle import NeedleExample, is_correct, make_needle_example
from kvengine.models import LoadedModel, load
from kvengine.press import press_from_spec
from kvengine.results import append_report, append_rows, make_row, markdown_table

DEFAULT_PRESSES = [
    "random",
    "streaming_llm",
    "knorm",
    "keydiff",
    "expected_attention",
    "snapkv",
    "pyramidkv",
    "tova",
    "h2o",
    "scissorhands",
    "adakv:expected_attention",
    "adakv:snapkv",
]
ANSWER = SamplingParams(max_tokens=24)  # the model often restates the sentence first


@dataclass
class Result:
    method: str  # press spec, "none" or "kivi-<bits>"
    ratio: float
    length: int  # requested context tokens
    correct: bool
    bytes_held: int
    bytes_uncompressed: int
    prefill_s: float
    compress_s: float


def _answer(engine: Engine, model: LoadedModel, context_id: int, rest: list[int]) -> str:
    seq_id = engine.add_request(rest, ANSWER, parent=context_id)
    engine.run()
    output = engine.release(seq_id).output_ids
    assert model.tokenizer is not None
    return str(model.tokenizer.decode(output, skip_special_tokens=True))


def prefill_context(engine: Engine, ids: list[int], keep_queries: bool) -> tuple[int, float]:
    """Add `ids` as a context and run it to the end; returns its id and the seconds taken."""
    start = time.perf_counter()
    context = engine.add_context(ids, keep_queries=keep_queries)
    engine.run()
    return context, time.perf_counter() - start


def run_example(
    model: LoadedModel, example: NeedleExample, specs: list[str], ratios: list[float], kivi: list[int]
) -> list[Result]:
    """Every press x ratio, and every KIVI width, on one example."""
    ids, rest = encode_prompt(model, example.context, None, None, example.question)
    scheduler = SchedulerConfig(max_num_seqs=4, max_step_tokens=len(ids))
    engine = Engine(model, CacheConfig(max_kv_bytes=2 * 2**30), scheduler)
    base, prefill_s = prefill_context(engine, ids, keep_queries=True)
    full = engine.cache.bytes_held(engine.sequences[base].kv)  # type: ignore[arg-type]
    out = _answer(engine, model, base, rest)
    results = [
        Result("none", 0.0, example.target_tokens, is_correct(example, out), full, full, prefill_s, 0.0)
    ]
    for spec in specs:
        for ratio in ratios:
            start = time.perf_counter()
            copy = engine.compress_context(base, press_from_spec(spec, ratio))
            compress_s = time.perf_counter() - start
            held = engine.cache.bytes_held(engine.sequences[copy].kv)  # type: ignore[arg-type]
            out = _answer(engine, model, copy, rest)
            engine.release(copy)
            results.append(
                Result(
                    spec,
                    ratio,
                    example.target_tokens,
                    is_correct(example, out),
                    held,
                    full,
                    prefill_s,
                    compress_s,
                )
            )
    for bits in kivi:
        # 32-token blocks: one key group per block, as in KIVI; 16 would double the key scales.
        kivi_engine = Engine(model, CacheConfig(block_size=32, max_kv_bytes=2**30, kv_bits=bits), scheduler)
        context, kivi_prefill_s = prefill_context(kivi_engine, ids, keep_queries=False)
        held = kivi_engine.cache.bytes_held(kivi_engine.sequences[context].kv)  # type: ignore[arg-type]
        out = _answer(kivi_engine, model, context, rest)
        results.append(
            Result(
                f"kivi-{bits}",
                0.0,
                example.target_tokens,
                is_correct(example, out),
                held,
                full,
                kivi_prefill_s,
                0.0,
            )
        )
    return results


def _summarize(results: list[Result], lengths: list[int]) -> tuple[list[dict[str, Any]], str]:
    groups: dict[tuple[str, float], dict[int, list[Result]]] = {}
    for r in results:
        groups.setdefault((r.method, r.ratio), {}).setdefault(r.length, []).append(r)
    rows, table = [], []
    for (method, ratio), by_length in groups.items():
        line: list[Any] = [method, f"{ratio:.2f}"]
        for length in lengths:
            rs = by_length.get(length, [])
            if not rs:
                line += ["-", "-"]
                continue
            acc = sum(r.correct for r in rs) / len(rs)
            frac = statistics.mean(r.bytes_held / r.bytes_uncompressed for r in rs)
            cfg = dict(method=method, ratio=ratio, length=length, examples=len(rs))
            rows.append(make_row("presses", "needle_accuracy", acc, "fraction", **cfg))
            rows.append(make_row("presses", "kv_bytes_fraction", frac, "of uncompressed", **cfg))
            line += [f"{acc:.2f}", f"{frac:.3f}"]
        overhead = [r.compress_s / r.prefill_s for rs in by_length.values() for r in rs]
        line.append(f"{100 * statistics.mean(overhead):.1f}%" if any(overhead) else "-")
        if any(overhead):
            rows.append(make_row("presses", "compress_over_prefill", statistics.mean(overhead), "fraction",
                                 method=method, ratio=ratio))  # fmt: skip
        table.append(line)
    header = ["method", "ratio"]
    for length in lengths:
        header += [f"accuracy @{length}", f"bytes @{length}"]
    header.append("compression time / prefill")
    return rows, markdown_table(header, table)


def run_presses_bench(
    model_name: str,
    lengths: list[int],
    specs: list[str],
    ratios: list[float],
    kivi: list[int],
    num_examples: int,
    out: Path,
    report: Path,
    *,
    command: str = "kvengine bench presses",
) -> list[dict[str, Any]]:
    """Run every example, append JSON rows to `out` and a table to `report` (headed by `command`)."""
    for spec in specs:
        press_from_spec(spec, ratios[0])  # bad names fail before any prefill
    model = load(model_name)
    depths = [(i + 0.5) / num_examples for i in range(num_examples)]
    results: list[Result] = []
    for length in tqdm(lengths, desc="lengths", unit="length"):
        for i, depth in enumerate(tqdm(depths, desc=f"{length} tokens", unit="example", leave=False)):
            example = make_needle_example(model, length, depth, seed=1000 * length + i)
            results += run_example(model, example, specs, ratios, kivi)
    rows, body = _summarize(results, lengths)
    append_rows(out, rows)
    print(body)
    append_report(
        report,
        "Presses: needle accuracy, bytes held, compression cost",
        command,
        body,
        f"Model {model.name}, fp32 cache, {num_examples} needle examples per length (depths spread evenly), "
        "greedy answers of up to 24 tokens, query-agnostic compression (the question comes after). "
        "bytes: what the pool holds for the context after compression, as a fraction of the uncompressed cache. "
        "Compression time is measured on a copy of the prefilled cache (Engine.compress_context) and divided by "
        "the prefill time of the same context.",
    )
    return rows
