"""How `kvengine eval` measures kvengine on one example: one prefill, a compressed copy per press.

The context is prefilled once (with its queries kept, for the presses that
score with them); every press compresses its own copy of that cache
(`Engine.compress_context`, the same cache inline compression gives) and all
the questions are asked of the copy, batched. KIVI widths prefill their own
engine, whose pool stores packed blocks, with no press. This module measures;
it does not score or write rows (`kvengine.eval.runner` does).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.selection import SelectionStats
from kvengine.eval.presses import prefill_context
from kvengine.models import LoadedModel
from kvengine.press import press_from_spec
from kvengine.press.methods import bound_press, is_selection, make_method

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
    start = time.perf_counter()
    seq_ids = [engine.add_request(rest, params, parent=context) for rest in rests]
    engine.run()
    assert model.tokenizer is not None
    outputs = [
        str(model.tokenizer.decode(engine.release(s).output_ids, skip_special_tokens=True)) for s in seq_ids
    ]
    return outputs, time.perf_counter() - start


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
    # A packed pool is laid out up front, so it is sized for this example: twice its fp bytes, with a
    # partly filled block per (layer, kv-head) cell for each sequence. 32-token blocks: one key group
    # per block, as in KIVI (and `kvengine bench presses`).
    block_size = 32
    tokens = num_tokens + num_questions * extra_tokens + (num_questions + 1) * block_size
    return Engine(
        model,
        CacheConfig(
            block_size=block_size,
            max_kv_bytes=2 * fp_bytes(model, tokens),
            kv_bits=kv_bits,
            **(storage or {}),
        ),
        scheduler,
    )


def measure(
    model: LoadedModel,
    ids: list[int],
    rests: list[list[int]],
    settings: list[Setting],
    max_new_tokens: int,
    storage: dict[str, Any] | None = None,
) -> Iterator[Measured]:
    """kvengine's answers to the questions `rests` about context `ids`, per setting, fp ones first.

    Settings with KIVI bits run on a packed pool (with `storage`'s options): press "none" as
    prefilled, a demote press on a copy of a context kept in full precision until it compresses it.
    """
    extra = max(len(r) for r in rests) + max_new_tokens  # tokens a question adds to the context
    params = SamplingParams(max_tokens=max_new_tokens)
    fp = [s for s in settings if not s[2]]
    if fp:
        engine = _engine(model, len(rests), len(ids), extra)
        if any(is_selection(s[0]) for s in fp):
            engine.pool.track_key_bounds()  # from the first write: a selection answers from this prefill too
        base, prefill_s = prefill_context(engine, ids, keep_queries=any(s[0] != "none" for s in fp))
        full = engine.cache.bytes_held(engine.sequences[base].kv)  # type: ignore[arg-type]
        for spec, ratio, _ in fp:
            if is_selection(spec):
                yield _measure_selection(engine, model, base, rests, (spec, ratio), params, prefill_s)
                continue
            start, context = time.perf_counter(), base
            if spec != "none":
                context = engine.compress_context(base, bound_press(spec, ratio, model))
            compress_s = time.perf_counter() - start if spec != "none" else 0.0
            held = engine.cache.bytes_held(engine.sequences[context].kv)  # type: ignore[arg-type]
            outputs, answer_s = _ask(engine, model, context, rests, params)
            if context != base:
                engine.release(context)
            yield Measured(spec, ratio, 0, outputs, held, full, prefill_s, compress_s, answer_s)
        engine.release(base)
    for bits in sorted({s[2] for s in settings if s[2]}):
        if ("none", 0.0, bits) in settings:
            kivi_engine = _engine(model, len(rests), len(ids), extra, bits, storage)
            context, prefill_s = prefill_context(kivi_engine, ids, keep_queries=False)
            held = kivi_engine.cache.bytes_held(kivi_engine.sequences[context].kv)  # type: ignore[arg-type]
            outputs, answer_s = _ask(kivi_engine, model, context, rests, params)
            full = fp_bytes(model, len(ids))
            yield Measured("none", 0.0, bits, outputs, held, full, prefill_s, 0.0, answer_s)
        demoted = [s for s in settings if s[2] == bits and s[0] != "none"]
        if demoted:
            yield from _measure_demoted(model, ids, rests, demoted, params, extra, storage)


def _measure_demoted(
    model: LoadedModel,
    ids: list[int],
    rests: list[list[int]],
    settings: list[Setting],
    params: SamplingParams,
    extra: int,
    storage: dict[str, Any] | None,
) -> Iterator[Measured]:
    """Demote presses at one KIVI width: one prefill kept in full precision, a demoted copy per setting."""
    engine = _engine(model, len(rests), len(ids), extra, settings[0][2], storage)
    base, prefill_s = prefill_context(engine, ids, keep_queries=True)
    full = fp_bytes(model, len(ids))
    for spec, ratio, bits in settings:
        start = time.perf_counter()
        context = engine.compress_context(base, press_from_spec(spec, ratio))
        compress_s = time.perf_counter() - start
        held = engine.cache.bytes_held(engine.sequences[context].kv)  # type: ignore[arg-type]
        outputs, answer_s = _ask(engine, model, context, rests, params)
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
