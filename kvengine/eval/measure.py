"""How `kvengine eval` measures kvengine on one example: one prefill, a compressed copy per press.

The context is prefilled once (with its queries kept, for the presses that
score with them); every press compresses its own copy of that cache
(`Engine.compress_context`, the same cache inline compression gives) and all
the questions are asked of the copy, batched. Each KIVI width prefills its
own engine, whose pool stores packed blocks, once: its settings (no press, a
demote press, an evicting press or duo then packing) each pack a copy of
that full-precision prefill. This module measures;
it does not score or write rows (`kvengine.eval.runner` does).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.selection import SelectionStats
from kvengine.eval.budget import PACKED_BLOCK_SIZE, storage_bytes_per_token
from kvengine.eval.presses import prefill_context
from kvengine.models import LoadedModel
from kvengine.press.methods import bound_press, is_selection, make_method
from kvengine.press.none import NoPress

Setting = tuple[str, float, int]  # (press, ratio, kivi)


@dataclass(frozen=True)
class Measured:
    """One setting's answers and costs. Bytes are held by the cache; seconds are wall time.

    `prefill_s + compress_s + answer_s` is the time from the context's token ids
    to every answer decoded: what "seconds per example" means for every engine.
    """

    press: str
    ratio: float
    kivi: int
    outputs: list[str]
    kv_bytes: int
    kv_bytes_full: int  # the uncompressed fp cache of the same context
    prefill_s: float
    compress_s: float
    answer_s: float
    blocks_read: float | None = None  # decode steps' blocks read over blocks held (block selection)


def row_seconds(row: dict[str, Any]) -> float:
    """Seconds per example of a result row (`Measured`'s fields as `kvengine eval` writes them)."""
    return float(row["prefill_s"] + row["compress_s"] + row["answer_s"])


def _ask(
    engine: Engine, model: LoadedModel, context: int, rests: list[list[int]], params: SamplingParams
) -> tuple[list[str], float]:
    """Every question continues `context` (batched together); returns the answers and the seconds taken."""
    answers, seconds = _ask_all(engine, model, [context], rests, params)
    return answers[0], seconds


def _ask_all(
    engine: Engine, model: LoadedModel, contexts: list[int], rests: list[list[int]], params: SamplingParams
) -> tuple[list[list[str]], float]:
    """Every question of every context, decoded in one batch: the answers per context, seconds per context.

    One batch, because a decode step of a small model costs about the same for
    one sequence as for a dozen (the weights are read once per step); the
    seconds are the batch's wall time shared equally among the contexts.
    """
    start = time.perf_counter()
    seq_ids = [[engine.add_request(rest, params, parent=c) for rest in rests] for c in contexts]
    engine.run()
    assert model.tokenizer is not None
    decode = model.tokenizer.decode
    outputs = [
        [str(decode(engine.release(s).output_ids, skip_special_tokens=True)) for s in ids] for ids in seq_ids
    ]
    return outputs, (time.perf_counter() - start) / max(1, len(contexts))


def fp_bytes(model: LoadedModel, num_tokens: int) -> int:
    """Bytes of an uncompressed fp cache of `num_tokens` (keys and values, every layer and kv-head)."""
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * num_tokens * model.num_layers * model.num_kv_heads * model.head_dim * itemsize


def _engine(
    model: LoadedModel,
    num_questions: int,
    num_tokens: int,
    extra_tokens: int,
    kv_bits: int = 0,
    storage: dict[str, Any] | None = None,
) -> Engine:
    """An engine for one context of `num_tokens` and `num_questions` continuations of `extra_tokens`.

    `storage`: more `CacheConfig` options of the packed pool (`kv_rotate`, `kv_key_groups`).
    """
    scheduler = SchedulerConfig(max_num_seqs=max(4, num_questions), max_step_tokens=num_tokens)
    if not kv_bits:
        return Engine(model, CacheConfig(), scheduler)  # fp pools are allocated lazily: the default is free
    # A packed pool is laid out up front, so it is sized for this example: a packed copy of the context
    # and of its continuations per sequence. 32-token blocks: one key group per block, as in KIVI (and
    # `kvengine bench presses`). Open blocks follow the longest step, here twice the context: a copy of
    # the full-precision context is written whole before its full blocks are sealed (the prefill itself
    # still takes one step). Each packed block is dequantized once, on its first read (`keep_decoded`):
    # the answers are the same, and the decode steps of many packed copies stop redoing it.
    cells = model.num_layers * model.num_kv_heads
    tokens = (num_questions + 1) * (num_tokens + extra_tokens + 2 * PACKED_BLOCK_SIZE)
    engine = Engine(
        model,
        CacheConfig(
            block_size=PACKED_BLOCK_SIZE,
            max_kv_bytes=int(tokens * cells * storage_bytes_per_token(model, kv_bits, storage)),
            kv_bits=kv_bits,
            **(storage or {}),
        ),
        dataclasses.replace(scheduler, max_step_tokens=2 * num_tokens),
    )
    assert isinstance(engine.pool, QuantizedBlockPool)
    engine.pool.keep_decoded()
    return engine


def measure(
    model: LoadedModel,
    ids: list[int],
    rests: list[list[int]],
    settings: list[Setting],
    max_new_tokens: int,
    storage: dict[str, Any] | None = None,
) -> Iterator[Measured]:
    """kvengine's answers to the questions `rests` about context `ids`, per setting, fp ones first.

    Settings with KIVI bits run on a packed pool (with `storage`'s options), one prefill per
    width kept in full precision, each setting on its own packed copy (`_measure_packed`).
    """
    extra = max(len(r) for r in rests) + max_new_tokens  # tokens a question adds to the context
    params = SamplingParams(max_tokens=max_new_tokens)
    fp = [s for s in settings if not s[2]]
    if fp:
        yield from _measure_fp(model, ids, rests, fp, params, extra)
    for bits in sorted({s[2] for s in settings if s[2]}):
        yield from _measure_packed(
            model, ids, rests, [s for s in settings if s[2] == bits], params, extra, storage
        )


def _measure_fp(
    model: LoadedModel,
    ids: list[int],
    rests: list[list[int]],
    settings: list[Setting],
    params: SamplingParams,
    extra: int,
) -> Iterator[Measured]:
    """The full-precision settings: one prefill, a compressed copy per press, all answered in one batch.

    A selection method (quest) answers from the prefill itself, on its own
    (it changes how the engine reads every sequence). Yields in `settings` order.
    """
    engine = _engine(model, len(rests) * len(settings), len(ids), extra)
    if any(is_selection(s[0]) for s in settings):
        engine.pool.track_key_bounds()  # from the first write: a selection answers from this prefill too
    base, prefill_s = prefill_context(engine, ids, keep_queries=any(s[0] != "none" for s in settings))
    full = engine.cache.bytes_held(engine.sequences[base].kv)  # type: ignore[arg-type]
    copies: dict[Setting, tuple[int, int, float]] = {}  # setting -> (context, bytes held, compress_s)
    for spec, ratio, bits in settings:
        if is_selection(spec):
            continue
        start, context = time.perf_counter(), base
        if spec != "none":
            context = engine.compress_context(base, bound_press(spec, ratio, model))
        compress_s = time.perf_counter() - start if spec != "none" else 0.0
        copies[spec, ratio, bits] = context, engine.cache.bytes_held(engine.sequences[context].kv), compress_s  # type: ignore[arg-type]
    answers, answer_s = _ask_all(engine, model, [c[0] for c in copies.values()], rests, params)
    done = {
        s: Measured(s[0], s[1], 0, outputs, held, full, prefill_s, compress_s, answer_s)
        for (s, (_, held, compress_s)), outputs in zip(copies.items(), answers, strict=True)
    }
    for context, _, _ in copies.values():
        if context != base:
            engine.release(context)
    for s in settings:
        if is_selection(s[0]):
            done[s] = _measure_selection(engine, model, base, rests, (s[0], s[1]), params, prefill_s)
    engine.release(base)
    yield from (done[s] for s in settings)


def _measure_packed(
    model: LoadedModel,
    ids: list[int],
    rests: list[list[int]],
    settings: list[Setting],
    params: SamplingParams,
    extra: int,
    storage: dict[str, Any] | None,
) -> Iterator[Measured]:
    """The settings of one KIVI width: one prefill kept in full precision, a packed copy per setting.

    "none" is a copy that keeps every token, packed as a packed prefill packs
    it (the prefill is one step: its attention is in full precision either
    way, then full blocks are sealed; tested equal); a demote press demotes
    its copy; any other press or method (duo) evicts, then what it keeps is packed.
    """
    engine = _engine(model, len(rests) * len(settings), len(ids), extra, settings[0][2], storage)
    base, prefill_s = prefill_context(engine, ids, keep_queries=True)
    full = fp_bytes(model, len(ids))
    copies = []  # (context, bytes held, compress_s) per setting
    for spec, ratio, _ in settings:
        start = time.perf_counter()
        context = engine.compress_context(
            base, NoPress() if spec == "none" else bound_press(spec, ratio, model)
        )
        compress_s = time.perf_counter() - start  # for "none": packing the copy
        copies.append((context, engine.cache.bytes_held(engine.sequences[context].kv), compress_s))  # type: ignore[arg-type]
    answers, answer_s = _ask_all(engine, model, [c[0] for c in copies], rests, params)
    for (spec, ratio, bits), (context, held, compress_s), outputs in zip(
        settings, copies, answers, strict=True
    ):
        engine.release(context)
        yield Measured(spec, ratio, bits, outputs, held, full, prefill_s, compress_s, answer_s)
    engine.release(base)


def _measure_selection(
    engine: Engine,
    model: LoadedModel,
    base: int,
    rests: list[list[int]],
    setting: tuple[str, float],
    params: SamplingParams,
    prefill_s: float,
) -> Measured:
    """A decoding-time selection method (quest) answering from the prefilled context `base` itself.

    Nothing is compressed: the whole cache is kept and each decode step reads
    the selected blocks. Bytes held count the per-block key bounds on top of
    the cache; `blocks_read` is over the answers' decode steps.
    """
    spec, ratio = setting
    kv = engine.sequences[base].kv
    assert kv is not None and engine.pool.key_bounds is not None
    num_blocks = int((kv.block_table >= 0).sum())
    held = engine.cache.bytes_held(kv) + num_blocks * engine.pool.key_bounds.bytes_per_block
    engine.runner.selection = make_method(spec, ratio).selection
    engine.runner.selection_stats = stats = SelectionStats()
    try:
        outputs, answer_s = _ask(engine, model, base, rests, params)
    finally:
        engine.runner.selection = None
    full = engine.cache.bytes_held(kv)
    return Measured(spec, ratio, 0, outputs, held, full, prefill_s, 0.0, answer_s, stats.read_fraction)
