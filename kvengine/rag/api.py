"""The Python API of chunk reuse: `rag_generate` runs one RAG prompt on an engine, in a chosen mode.

In "reuse" and "blend" modes, the chunks (and the text before the first one,
a true prefix) are read from the chunk store, computed first if missing;
the cache up to the end of the last chunk is assembled (blend.py), written
into fresh pool blocks and handed to the engine as a ready context
(`Engine.add_kv_context`); the rest of the prompt continues it as a request
(`add_request(..., parent=...)`), which the engine computes and decodes as
any other. "full" runs the whole prompt as a plain request. Everything is
checked (spans, prompt, model) before anything is computed or cached.

This runs the engine until its request finishes: it is for a caller that owns
the engine (a benchmark, a script), not for the server's driver loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from kvengine.cache.paged import SequenceKV
from kvengine.engine.engine import Engine
from kvengine.engine.request import RequestOutput, SamplingParams
from kvengine.rag.blend import BlendConfig, Piece, assemble
from kvengine.rag.chunks import ChunkStore
from kvengine.rag.rotation import check_rerotatable
from kvengine.rag.spans import RagPrompt, check_spans


@dataclass(frozen=True)
class RagResult:
    """A finished RAG request: its output, time to first token from the call, and what was reused."""

    output: RequestOutput
    ttft_s: float  # from the call (chunk reads, assembly and recompute included) to the first token
    num_reused_tokens: int  # prompt tokens whose cache came from the chunk store unchanged above selection
    num_recomputed_tokens: int  # context tokens computed through every layer during assembly
    num_chunks_computed: int  # chunks the store lacked and computed in this call


def rag_generate(
    engine: Engine,
    prompt: RagPrompt,
    params: SamplingParams | None = None,
    *,
    blend: BlendConfig | None = None,
    cache_salt: str = "",
) -> RagResult:
    """Run `prompt` to the end on `engine`, reusing its chunks as `blend` says (default: blend 15%).

    Raises InvalidRequestError (bad spans, prompt or settings) or
    UnsupportedModelError (keys that cannot be re-rotated) before anything
    is computed or cached.
    """
    start = time.perf_counter()
    blend = blend or BlendConfig()
    params = params or SamplingParams()
    ids = list(prompt.token_ids)
    engine.intake.check_prompt(ids)
    spans = check_spans(prompt.spans, len(ids), engine.model.max_context_len)
    if blend.mode == "full":
        return _finish(engine, engine.add_request(ids, params, cache_salt=cache_salt), start, 0, 0, 0)
    check_rerotatable(engine.model)
    store = ChunkStore(engine)
    end = spans[-1][1] if spans else 0
    placed = [(0, spans[0][0])] if spans and spans[0][0] > 0 else []
    placed += list(spans)  # the text before the first chunk is a prefix: kept and read as a chunk
    chunks = [ids[s:e] for s, e in placed]
    num_computed = store.ensure(chunks, cache_salt)
    pieces = []
    for (s, _), chunk in zip(placed, chunks, strict=True):
        kv = store.fetch(chunk, cache_salt)
        pieces.append(Piece(s, kv.keys, kv.values))
    made = assemble(engine.model, ids[:end], pieces, blend)
    blocks = _write(engine, made.keys, made.values)
    try:
        context_id = engine.add_kv_context(ids[:end], blocks)
    except Exception:
        engine.cache.free(blocks)
        raise
    try:
        seq_id = engine.add_request(ids[end:], params, parent=context_id)
    except Exception:
        engine.release(context_id)
        raise
    return _finish(engine, seq_id, start, made.num_reused, made.num_recomputed, num_computed, context_id)


def _write(engine: Engine, keys: torch.Tensor, values: torch.Tensor) -> SequenceKV:
    """Fresh pool blocks holding `keys` / `values` `(L, H_kv, T, D)` at positions 0..T-1 (evicting cached prefixes if short)."""
    cache = engine.cache
    num_tokens = keys.shape[2]
    short = cache.blocks_for_tokens(num_tokens) - engine.pool.num_free_blocks
    if short > 0 and engine.prefix is not None:
        engine.prefix.evict(short)
    kv = cache.new_sequence()
    slots = cache.append(kv, num_tokens)  # (L, H, T); raises OutOfBlocksError and takes nothing if short
    dim = keys.shape[-1]
    engine.pool.write(slots.flatten(), keys.reshape(-1, dim), values.reshape(-1, dim))
    return kv


def _finish(
    engine: Engine,
    seq_id: int,
    start: float,
    num_reused: int,
    num_recomputed: int,
    num_computed: int,
    context_id: int | None = None,
) -> RagResult:
    """Step until request `seq_id` finishes; release it (and its context)."""
    seq = engine.sequences[seq_id]
    while not seq.is_finished:
        engine.step()
        if engine.last_step_size == 0:
            raise RuntimeError("the engine can run none of its unfinished requests")
    first = seq.first_token_time or seq.finish_time or time.perf_counter()
    output = RequestOutput.of(engine.release(seq_id))
    if context_id is not None:
        engine.release(context_id)
    return RagResult(output, first - start, num_reused, num_recomputed, num_computed)
