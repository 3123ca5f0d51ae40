"""`kvengine bench selection`: query-aware block selection (quest) vs full attention, same run.

For each of `examples` `needle_hard` contexts per length (seeds
`first_example`, ...; example i's needle at depth `(0.5 + 0.618 i) mod 1`,
so that consecutive runs spread over the context), one engine prefills the context once (its
queries kept, the pool tracking per-block key bounds). From that prefill:

- the question is answered greedily reading every block, with quest's
  selection (its hyperparameters `quest`, e.g. `{"heads": "sum",
  "neighbours": 1}`) and with each other set of hyperparameters in `also`
  (system `quest_<spec>`, e.g. `quest_heads=max`, same ratio), in an order
  rotated from one example to the next; every decode step of the first two
  is timed (the whole engine step: model forward, attention, sampling) and
  quest's blocks read are counted;
- one decode step's attention alone (`attention._decode`, every layer, the
  query of the context's last token, `batch` copies of the sequence in the
  decode batch) is timed with and without selection, alternating within
  each repeat, with the selection's own cost (ranking blocks, building the
  smaller slot table) timed apart.

Rows are appended after every example (its answers and its medians), so
an interrupted run keeps what it measured; medians over examples, repeats
and steps are reported at the end, with the load average, since the
machine may be shared. Same attention kernel (or SDPA
fallback) for both systems, whichever the engine uses.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.attention import ForwardContext, SeqSpan, _decode, decode_batch
from kvengine.engine.engine import Engine
from kvengine.engine.generate import encode_prompt
from kvengine.engine.request import SamplingParams
from kvengine.engine.selection import BlockSelection, SelectionStats, select_blocks
from kvengine.errors import InvalidRequestError
from kvengine.eval.presses import prefill_context
from kvengine.eval.tasks import make_example
from kvengine.eval.tasks.example import score
from kvengine.models import LoadedModel, load
from kvengine.press.methods import make_method
from kvengine.results import append_report, append_rows, make_row, markdown_table

SYSTEMS = ("full", "quest")  # timed; `also` adds answer-only systems quest_<spec>
Samples = dict[str, list[float]]


def _attention_times(
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


def time_attention(
    engine: Engine, context: int, selection: BlockSelection, batch: int, repeats: int, into: Samples
) -> None:
    """Add `repeats` timings of one decode step's attention at `batch` copies of `context` to `into`."""
    seq = engine.sequences[context]
    assert seq.kv is not None
    spans = [SeqSpan(i, i + 1, seq.kv, seq.kv.max_len) for i in range(batch)]
    queries = {layer: q[:, -1].expand(batch, -1, -1).contiguous() for layer, q in seq.queries.items()}
    pool, scale = engine.pool, engine.runner._scaling
    contexts = {
        name: ForwardContext(
            pool, spans, torch.empty(0), decode_batch(spans, pool.zero_slot, False), engine.runner._kernel,
            sel, SelectionStats(),
        )
        for name, sel in (("full", None), ("quest", selection))
    }  # fmt: skip
    with torch.inference_mode():
        _attention_times(engine, contexts["quest"], queries, scale)  # warm-up (and a kernel build)
        for _ in range(repeats):
            for name, ctx in contexts.items():
                total, select = _attention_times(engine, ctx, queries, scale)
                into[f"attention_{name}_b{batch}"].append(total)
                if name == "quest":
                    into[f"selection_b{batch}"].append(select)


def answer(
    engine: Engine, context: int, rest: list[int], selection: BlockSelection | None, max_tokens: int
) -> tuple[str, list[float], SelectionStats]:
    """Greedy answer to `rest` after `context`; its text, each decode step's seconds, blocks read."""
    engine.runner.selection = selection
    engine.runner.selection_stats = stats = SelectionStats()
    seq = engine.add_request(rest, SamplingParams(max_tokens=max_tokens), parent=context)
    steps = []
    try:
        while engine.has_unfinished():
            start = time.perf_counter()
            engine.step()
            steps.append(time.perf_counter() - start)
    finally:
        engine.runner.selection = None
    tokenizer = engine.model.tokenizer
    assert tokenizer is not None
    text = str(tokenizer.decode(engine.release(seq).output_ids, skip_special_tokens=True))
    return text, steps[1:], stats  # the first step runs the question's tokens: not a decode step


def measure_example(
    model: LoadedModel, length: int, index: int, selections: dict[str, BlockSelection | None],
    batches: list[int], repeats: int, max_tokens: int, samples: Samples,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every system (`selections`: name -> selection, None for full) on example `index`.

    Rows of their answers and medians; timings added to `samples`.
    """
    selection = selections["quest"]
    assert selection is not None
    assert model.tokenizer is not None
    depth = round((0.5 + 0.618034 * index) % 1.0, 4)
    mine: Samples = defaultdict(list)
    example = make_example("needle_hard", model.tokenizer, length, seed=index, depth=depth)
    question = example.questions[0]
    ids, rest = encode_prompt(model, example.context, None, None, question.text)
    scheduler = SchedulerConfig(max_num_seqs=max(4, *batches), max_step_tokens=len(ids))
    engine = Engine(model, CacheConfig(), scheduler)
    engine.runner.select_blocks(selection)  # the pool tracks key bounds from the prefill on
    context, prefill_s = prefill_context(engine, ids, keep_queries=True)
    rows = []
    names = list(selections)
    order = names[index % len(names) :] + names[: index % len(names)]
    for name in order:
        sel = selections[name]
        text, steps, stats = answer(engine, context, rest, sel, max_tokens)
        if name in SYSTEMS:
            mine[f"step_{name}"] += steps
        correct = score(question.answers, text) == 1.0
        mine[f"correct_{name}"].append(float(correct))
        if name == "quest":
            mine["blocks_read"].append(int(stats.blocks_read))
            mine["blocks_held"].append(int(stats.blocks_held))
        how = dict(heads=sel.heads, neighbours=sel.neighbours) if sel else {}
        cfg = dict(system=name, length=length, tokens=len(ids), seed=index, depth=depth, output=text, **how)
        rows.append(make_row("selection", "correct", float(correct), "bool", prefill_s=prefill_s, **cfg))
    for batch in batches:
        time_attention(engine, context, selection, batch, repeats, mine)
    medians = {key: statistics.median(v) for key, v in mine.items() if key.startswith(("step", "att", "sel"))}
    rows.append(make_row("selection", "example_medians_s", 0.0, "s", length=length, seed=index, **medians,
                         blocks_read=mine["blocks_read"][0], blocks_held=mine["blocks_held"][0]))  # fmt: skip
    for key, values in mine.items():
        samples[key] += values
    return rows


def summary_rows(
    samples: Samples, length: int, batches: list[int], cfg: dict[str, Any]
) -> list[dict[str, Any]]:
    """The medians and totals of one length as JSON rows."""
    med = {k: statistics.median(v) for k, v in samples.items() if v}
    rows = [
        make_row("selection", "accuracy", statistics.mean(values), "fraction", system=key[8:], **cfg)
        for key, values in samples.items()
        if key.startswith("correct_")
    ]
    rows += [make_row("selection", "decode_step_s", med[f"step_{s}"], "s", system=s, **cfg) for s in SYSTEMS]
    read = sum(samples["blocks_read"]) / max(1.0, sum(samples["blocks_held"]))
    rows.append(make_row("selection", "blocks_read_fraction", read, "fraction", system="quest", **cfg))
    for b in batches:
        for s in SYSTEMS:
            rows.append(make_row("selection", "attention_s_per_step", med[f"attention_{s}_b{b}"], "s",
                                 system=s, batch=b, **cfg))  # fmt: skip
        rows.append(make_row("selection", "selection_s_per_step", med[f"selection_b{b}"], "s",
                             system="quest", batch=b, **cfg))  # fmt: skip
    return rows


def tables(samples_by_length: dict[int, Samples], batches: list[int]) -> str:
    """Markdown: accuracy and decode step per length, then attention per step per length and batch."""
    acc, att = [], []
    extra = sorted({k[8:] for s in samples_by_length.values() for k in s if k.startswith("correct_quest_")})
    for length, s in samples_by_length.items():
        med = {k: statistics.median(v) for k, v in s.items() if v}
        n = len(s["correct_full"])
        read = sum(s["blocks_read"]) / max(1.0, sum(s["blocks_held"]))
        acc.append([
            length, n, int(sum(s["correct_full"])), int(sum(s["correct_quest"])),
            *(int(sum(s[f"correct_{name}"])) for name in extra), f"{read:.3f}",
            f"{1000 * med['step_full']:.1f}", f"{1000 * med['step_quest']:.1f}",
            f"{med['step_quest'] / med['step_full']:.2f}",
        ])  # fmt: skip
        for b in batches:
            full, quest = med[f"attention_full_b{b}"], med[f"attention_quest_b{b}"]
            att.append([length, b, f"{1000 * full:.2f}", f"{1000 * quest:.2f}", f"{quest / full:.2f}",
                        f"{1000 * med[f'selection_b{b}']:.2f}"])  # fmt: skip
    first = markdown_table(
        ["length", "examples", "full correct", "quest correct", *(f"{name} correct" for name in extra),
         "blocks read / step", "full decode step ms", "quest decode step ms", "quest / full"], acc)  # fmt: skip
    second = markdown_table(
        ["length", "batch", "full attention ms/step", "quest attention ms/step", "quest / full",
         "of which selection ms"], att)  # fmt: skip
    return first + "\n\n" + second


def run_selection_bench(
    model_name: str, lengths: list[int], ratio: float, batches: list[int], repeats: int, out: Path,
    report: Path, *, examples: int = 8, first_example: int = 0, max_tokens: int = 24,
    quest: dict[str, Any] | None = None, also: list[dict[str, Any]] | None = None,
    command: str = "kvengine bench selection",
) -> list[dict[str, Any]]:  # fmt: skip
    """Every length: append JSON rows to `out` and the tables to `report`."""
    if first_example < 0 or examples < 1 or repeats < 1 or not batches or min(batches) < 1:
        raise InvalidRequestError(
            f"bench selection: first_example must be >= 0 and examples, repeats and every batch >= 1, got "
            f"first_example={first_example}, examples={examples}, repeats={repeats}, batches={batches}"
        )
    selections: dict[str, BlockSelection | None] = {"full": None}
    for name, how in (("quest", quest or {}), *((f"quest_{spec_text(h)}", h) for h in also or [])):
        selections[name] = make_method("quest", ratio, **how).selection  # validates every hyperparameter
    main = selections["quest"]
    assert main is not None
    model = load(model_name)
    rows: list[dict[str, Any]] = []
    by_length: dict[int, Samples] = {}
    load_before = os.getloadavg()
    for length in lengths:
        samples: Samples = defaultdict(list)
        for index in range(first_example, first_example + examples):
            done = measure_example(model, length, index, selections, batches, repeats, max_tokens, samples)
            append_rows(out, done)
            rows += done
        cfg = dict(method="quest", ratio=ratio, heads=main.heads, neighbours=main.neighbours, length=length,
                   examples=examples,
                   first_example=first_example, repeats=repeats, load_before=load_before,
                   load_after=os.getloadavg())  # fmt: skip
        summary = summary_rows(samples, length, batches, cfg)
        append_rows(out, summary)
        rows += summary
        by_length[length] = samples
    body = tables(by_length, batches)
    print(body)
    load_after = os.getloadavg()
    append_report(
        report,
        "Query-aware block selection (quest) vs full attention: accuracy, blocks read, time per step",
        command,
        body,
        f"Model {model.name} ({model.dtype}), {examples} needle_hard examples per length (seeds "
        f"{first_example}..{first_example + examples - 1}, example i's needle at depth (0.5 + 0.618 i) mod 1), greedy answers of up to {max_tokens} tokens from one shared prefill, "
        f"systems in an order rotated per example. quest (heads={main.heads}, neighbours={main.neighbours}) at "
        f"ratio {ratio} reads ceil({1 - ratio:.3f} x blocks) of each cell's blocks per decode step (sinks and "
        "recent included); quest_<spec>: the same budget with those hyperparameters, answers only. Decode step: the whole engine step, "
        "median over every decode step of every answer. Attention: one decode step summed over all layers "
        f"(kernel or SDPA fallback as the engine picks), full and quest alternating within each of {repeats} "
        f"repeats per example, medians. Load average (1, 5, 15 min) {_load(load_before)} before, "
        f"{_load(load_after)} after: the machine may be shared with other jobs.",
    )
    return rows


def spec_text(how: dict[str, Any]) -> str:
    """`{"heads": "sum", "neighbours": 1}` as `heads=sum,neighbours=1` (a system's name)."""
    return ",".join(f"{key}={value}" for key, value in how.items())


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def summarize_file(path: Path) -> str:
    """The tables over every example a JSONL of this bench holds (runs split by `--first-example` included).

    Per length: answers counted once per (seed, system), the last row
    winning; timings are medians of the per-example medians.
    """
    answers: dict[tuple[int, int, str], float] = {}
    medians: dict[tuple[int, int], dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        cfg = row["config"]
        if row["bench"] == "selection" and row["metric"] == "correct":
            answers[cfg["length"], cfg["seed"], cfg["system"]] = row["value"]
        elif row["bench"] == "selection" and row["metric"] == "example_medians_s":
            medians[cfg["length"], cfg["seed"]] = cfg
    by_length: dict[int, Samples] = defaultdict(lambda: defaultdict(list))
    batches: set[int] = set()
    for (length, _), cfg in sorted(medians.items()):
        samples = by_length[length]
        for key, value in cfg.items():
            if key.startswith(("step_", "attention_", "selection_")):
                samples[key].append(value)
                batches |= {int(key.rsplit("_b", 1)[1])} if "_b" in key else set()
            elif key in ("blocks_read", "blocks_held"):
                samples[key].append(value)
    for (length, seed, system), value in sorted(answers.items()):
        if (length, seed) in medians:
            by_length[length][f"correct_{system}"].append(value)
    return tables(dict(sorted(by_length.items())), sorted(batches))
