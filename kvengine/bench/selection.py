"""`kvengine bench selection`: query-aware block selection (quest) vs full attention, same run.

For each task in `tasks` (default `needle_hard`; the RULER-style needle
tasks too), each length and each of `examples` examples (seeds
`first_example`, ...; example i's needle at depth `(0.5 + 0.618 i) mod 1`,
so that consecutive runs spread over the context), one engine prefills the
context once (its queries kept, the pool tracking per-block key bounds).
From that prefill:

- every question of the example is answered greedily reading every block
  (system `full`), with quest's selection (`quest`, its hyperparameters
  e.g. `{"heads": "sum", "neighbours": 1}`) and with each other set in
  `also` (system `quest_<spec>`, e.g. `quest_heads=max`; a `ratio` key
  there overrides the run's ratio), in an order rotated from one example
  to the next; every decode step is timed (the whole engine step) and each
  system's blocks read and held are counted over every layer (a dense
  layer reads all of its blocks);
- one decode step's attention alone (`attention._decode`, every layer, the
  query of the context's last token, `batch` copies of the sequence in the
  decode batch) is timed for full attention and every quest system,
  alternating within each repeat, with each selection's own cost (ranking
  blocks, building the smaller slot table) timed apart.

Rows are appended after every example (its answers and its medians), and
examples already in `out` are skipped, so a stopped run resumes. The
tables (`selection_report.py`) give per task and setting the score against
full's with a bootstrap interval, blocks read and attention time, with the
load average, since the machine may be shared. Same attention kernel (or
SDPA fallback) for every system, whichever the engine uses.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from kvengine.bench.selection_report import load_results, summarize_file
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.attention import ForwardContext, SeqSpan, _decode, decode_batch
from kvengine.engine.engine import Engine
from kvengine.engine.generate import encode_prompt
from kvengine.engine.request import SamplingParams
from kvengine.engine.selection import BlockSelection, SelectionStats, select_blocks
from kvengine.errors import InvalidRequestError
from kvengine.eval.presses import prefill_context
from kvengine.eval.tasks import Example, expand_task_names, make_example
from kvengine.eval.tasks.example import score
from kvengine.models import LoadedModel, load
from kvengine.press.methods import make_method
from kvengine.results import append_report, append_rows, make_row

Samples = dict[str, list[float]]
Selections = dict[str, BlockSelection | None]  # system name -> its selection (None: full attention)


def build_selections(
    ratio: float, quest: dict[str, Any] | None = None, also: list[dict[str, Any]] | None = None
) -> Selections:
    """`full`, `quest` (hyperparameters `quest`) and `quest_<spec>` per entry of `also` (`ratio` may override).

    Every hyperparameter is validated by the quest method (unknown ones and bad values named).
    """
    selections: Selections = {"full": None}
    for name, how in (("quest", quest or {}), *((f"quest_{spec_text(h)}", h) for h in also or [])):
        how = dict(how)
        own = how.pop("ratio", ratio)
        if isinstance(own, bool) or not isinstance(own, int | float):
            raise InvalidRequestError(f"bench selection: ratio must be a number, got {own!r} in {name}")
        selections[name] = make_method("quest", float(own), **how).selection
    return selections


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
        if sel is not None and bounds is not None and layer >= sel.dense_layers:
            start = time.perf_counter()
            select_blocks(
                sel, bounds, q, ctx.decode.slots[layer], ctx.decode.lens[layer], engine.pool.zero_slot
            )
            select += time.perf_counter() - start
    return total, select


def time_attention(
    engine: Engine, context: int, selections: Selections, batch: int, repeats: int, into: Samples
) -> None:
    """Add `repeats` timings of one decode step's attention per system at `batch` copies of `context`."""
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
        for name, sel in selections.items()
    }  # fmt: skip
    with torch.inference_mode():
        for ctx in contexts.values():  # warm-up (and a kernel build)
            _attention_times(engine, ctx, queries, scale)
        for _ in range(repeats):
            for name, ctx in contexts.items():
                total, select = _attention_times(engine, ctx, queries, scale)
                into[f"attention_{name}_b{batch}"].append(total)
                if ctx.selection is not None:
                    into[f"selection_{name}_b{batch}"].append(select)


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


def answer_all(
    engine: Engine, context: int, example: Example, rests: list[list[int]],
    selection: BlockSelection | None, max_tokens: int,
) -> tuple[dict[str, Any], list[float]]:  # fmt: skip
    """Every question of `example` from the prefilled `context`: row fields, and the decode steps' seconds."""
    outputs, scores, steps, read, held = [], [], [], 0, 0
    for question, rest in zip(example.questions, rests, strict=True):
        text, own_steps, stats = answer(engine, context, rest, selection, max_tokens)
        outputs.append(text)
        scores.append(score(question.answers, text))
        steps += own_steps
        read, held = read + int(stats.blocks_read), held + int(stats.blocks_held)
    fields = dict(scores=scores, outputs=outputs, blocks_read=read, blocks_held=held)
    if selection is not None:
        fields |= dict(fraction=selection.fraction, heads=selection.heads, neighbours=selection.neighbours,
                       dense_layers=selection.dense_layers, sink_blocks=selection.sink_blocks,
                       recent_blocks=selection.recent_blocks)  # fmt: skip
    return fields, steps


def measure_example(
    model: LoadedModel, task: str, length: int, index: int, selections: Selections,
    batches: list[int], repeats: int, max_tokens: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Every system (`selections`) on example `index` of `task`: rows of its answers and its medians."""
    assert model.tokenizer is not None
    depth = round((0.5 + 0.618034 * index) % 1.0, 4)
    example = make_example(task, model.tokenizer, length, seed=index, depth=depth)
    prompts = [encode_prompt(model, example.context, None, None, q.text) for q in example.questions]
    ids, rests = prompts[0][0], [rest for _, rest in prompts]
    scheduler = SchedulerConfig(max_num_seqs=max(4, *batches), max_step_tokens=len(ids))
    engine = Engine(model, CacheConfig(), scheduler)
    quest = selections["quest"]
    assert quest is not None
    engine.runner.select_blocks(quest)  # the pool tracks key bounds from the prefill on
    context, prefill_s = prefill_context(engine, ids, keep_queries=True)
    mine: Samples = defaultdict(list)
    rows = []
    names = list(selections)
    for name in names[index % len(names) :] + names[: index % len(names)]:
        fields, steps = answer_all(engine, context, example, rests, selections[name], max_tokens)
        mine[f"step_{name}"] += steps
        value = statistics.mean(fields["scores"])
        rows.append(make_row("selection", "score", value, "fraction", system=name, task=task, length=length,
                             tokens=len(ids), seed=index, depth=depth, prefill_s=prefill_s, **fields))  # fmt: skip
    for batch in batches:
        time_attention(engine, context, selections, batch, repeats, mine)
    medians = {key: statistics.median(v) for key, v in mine.items() if v}
    rows.append(make_row("selection", "example_medians_s", 0.0, "s", task=task, length=length, seed=index,
                         load=os.getloadavg(), **medians))  # fmt: skip
    return rows


def run_selection_bench(
    model_name: str, lengths: list[int], ratio: float, batches: list[int], repeats: int, out: Path,
    report: Path, *, tasks: list[str] | None = None, examples: int = 8, first_example: int = 0,
    max_tokens: int = 24, quest: dict[str, Any] | None = None, also: list[dict[str, Any]] | None = None,
    time_limit_s: float = 0.0, command: str = "kvengine bench selection",
) -> list[dict[str, Any]]:  # fmt: skip
    """Every length and task: append JSON rows to `out` (examples already there skipped), tables to `report`.

    Seeds are the outer loop, tasks the inner one, so that a stopped run has
    covered every task alike. With `time_limit_s`, no example starts that
    the longest one so far would carry past it (a rerun resumes).
    """
    bad = first_example < 0 or examples < 1 or repeats < 1 or not batches or min(batches) < 1
    if bad or time_limit_s < 0:
        raise InvalidRequestError(
            f"bench selection: first_example and time_limit_s must be >= 0 and examples, repeats and every "
            f"batch >= 1, got first_example={first_example}, time_limit_s={time_limit_s}, examples={examples}, "
            f"repeats={repeats}, batches={batches}"
        )
    tasks = expand_task_names(tasks or ["needle_hard"])
    selections = build_selections(ratio, quest, also)
    model = load(model_name)
    done = set(load_results(out)[1]) if out.exists() else set()
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    seeds = range(first_example, first_example + examples)
    todo = [(n, t, i) for n in lengths for i in seeds for t in tasks if (t, n, i) not in done]
    start, longest = time.perf_counter(), 0.0
    for length, task, index in todo:
        if time_limit_s and time.perf_counter() - start + longest > time_limit_s:
            print(f"bench selection: time limit reached before {task} seed {index}; a rerun resumes")
            break
        began = time.perf_counter()
        new = measure_example(model, task, length, index, selections, batches, repeats, max_tokens)
        longest = max(longest, time.perf_counter() - began)
        append_rows(out, new)
        rows += new
    body = summarize_file(out, tasks, lengths)
    print(body)
    described = "; ".join(f"{name}: {_describe(sel)}" for name, sel in selections.items() if sel)
    notes = (
        f"Model {model.name} ({model.dtype}); tasks {', '.join(tasks)}; seeds {seeds.start}..{seeds.stop - 1} "
        f"(example i's needle at depth (0.5 + 0.618 i) mod 1; every example {out} holds is counted); greedy "
        f"answers of up to {max_tokens} tokens from one shared prefill per example, systems in an order "
        f"rotated per example. Settings: {described}. Correct: the sum over examples of each example's "
        "score (fraction of a question's answers found, mean over its questions); interval: 95% bootstrap "
        "over examples. Blocks read: over every decode step, layer and kv-head. Attention: one decode step "
        f"summed over all layers, every system alternating within each of {repeats} repeats per example, "
        f"medians of per-example medians. Load average (1, 5, 15 min) {_load(load_before)} before, "
        f"{_load(os.getloadavg())} after: the machine may be shared with other jobs."
    )
    title = "Query-aware block selection (quest) vs full attention: accuracy, blocks read, time per step"
    append_report(report, title, command, body, notes)
    return rows


def _describe(sel: BlockSelection) -> str:
    return (
        f"reads {sel.fraction:.3f} of a cell's blocks (sinks {sel.sink_blocks}, recent {sel.recent_blocks}), "
        f"heads={sel.heads}, neighbours={sel.neighbours}, first {sel.dense_layers} layers dense"
    )


def spec_text(how: dict[str, Any]) -> str:
    """`{"heads": "sum", "neighbours": 1}` as `heads=sum,neighbours=1` (a system's name)."""
    return ",".join(f"{key}={value}" for key, value in how.items())


def _load(values: tuple[float, float, float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)
