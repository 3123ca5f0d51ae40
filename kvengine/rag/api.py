"""The engine-side API of chunk reuse: check a RAG prompt, queue its missing chunks, add it as a request.

In "reuse" and "blend" modes, the chunks (and the text before the first one,
a true prefix) are read from the chunk store; the cache up to the end of the
last chunk is assembled (blend.py), written into fresh pool blocks and handed
to the engine as a ready context (`Engine.add_kv_context`); the rest of the
prompt continues it as a request (`add_request(..., parent=...)`), which the
engine computes and decodes as any other, and releasing that request releases
the context. "full" runs the whole prompt as a plain request. Everything is
checked (spans, prompt, model, prefix cache) before anything is computed or
cached.

- `rag_generate` runs one prompt to the end on an engine the caller owns (a
  benchmark, a script): it steps the engine itself.
- `check_rag`, `queue_chunks` and `add_rag_request` never step the engine;
  they are the pieces the server runs on its driver, between steps
  (serving.py).
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
    ttft_cpu_s: float  # this process's CPU time over the same span (steadier than wall time when shared)
    num_reused_tokens: int  # prompt tokens whose cache came from the chunk store unchanged above selection
    num_recomputed_tokens: int  # context tokens computed through every layer during assembly
    num_chunks_computed: int  # chunks the store lacked and computed in this call


@dataclass(frozen=True)
class Added:
    """A RAG request queued in an engine, and what its assembly did."""

    seq_id: int
    num_reused_tokens: int
    num_recomputed_tokens: int


def check_rag(engine: Engine, prompt: RagPrompt, blend: BlendConfig) -> RagPrompt:
    """The prompt with its spans checked and sorted; raises before anything is computed or cached.

    InvalidRequestError for a bad prompt or spans, or (reuse, blend) an engine
    without the prefix cache; UnsupportedModelError for keys that cannot be
    re-rotated.
    """
    ids = list(prompt.token_ids)
    engine.intake.check_prompt(ids)
    spans = check_spans(prompt.spans, len(ids), engine.model.max_context_len)
    if blend.mode != "full":
        check_rerotatable(engine.model)
        ChunkStore(engine)  # refuses an engine without a prefix cache
    return RagPrompt(ids, spans)


def _stored(prompt: RagPrompt, blend: BlendConfig) -> list[tuple[list[int], int, int]]:
    """What the store keeps for the prompt: (sequence, anchor length, start in the prompt) per piece.

    The text before the first chunk (the head, a prefix, if any) comes first;
    then each chunk. With `blend.anchor` "head", each chunk is kept after the
    head, and the first one with it, as the prefix it then is.
    """
    ids, spans = prompt.token_ids, prompt.spans
    if not spans:
        return []
    head = ids[: spans[0][0]]
    if blend.anchor == "head":
        first = [(ids[: spans[0][1]], 0, 0)]
        return first + [(head + ids[s:e], len(head), s) for s, e in spans[1:]]
    return ([(head, 0, 0)] if head else []) + [(ids[s:e], 0, s) for s, e in spans]


def stored_sequences(prompt: RagPrompt, blend: BlendConfig) -> list[list[int]]:
    """The token sequences the chunk store must hold to assemble `prompt` as `blend` says."""
    return [seq for seq, _, _ in _stored(prompt, blend)]


def queue_chunks(engine: Engine, prompt: RagPrompt, blend: BlendConfig, cache_salt: str = "") -> list[int]:
    """Queue a one-token request for each of the prompt's chunks the store lacks; their ids."""
    store = ChunkStore(engine)
    return store.queue(stored_sequences(prompt, blend), cache_salt)


def add_rag_request(
    engine: Engine,
    prompt: RagPrompt,
    params: SamplingParams,
    blend: BlendConfig,
    cache_salt: str = "",
) -> Added:
    """Assemble the prompt's context from the chunk store and queue the request that continues it.

    `prompt` must have passed `check_rag`. Chunks the store lacks (or lost)
    are computed in full as uncovered tokens. Never steps the engine; if
    anything fails, nothing is left in the pool or queued.
    """
    ids = prompt.token_ids
    if blend.mode == "full":
        return Added(engine.add_request(ids, params, cache_salt=cache_salt), 0, 0)
    store = ChunkStore(engine)
    end = prompt.spans[-1][1]
    pieces = []
    for seq, skip, start in _stored(prompt, blend):
        kv = store.fetch(seq, cache_salt, skip)
        pieces.append(Piece(start, kv.keys, kv.values, origin=skip))
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
    engine.shared_prompts[context_id] = {seq_id}  # releasing the request releases its context
    return Added(seq_id, made.num_reused, made.num_recomputed)


def rag_generate(
    engine: Engine,
    prompt: RagPrompt,
    params: SamplingParams | None = None,
    *,
    blend: BlendConfig | None = None,
    cache_salt: str = "",
) -> RagResult:
    """Run `prompt` to the end on `engine`, reusing its chunks as `blend` says (default: blend 15%).

    Missing chunks are computed first (stepping the engine). Raises
    InvalidRequestError (bad spans, prompt or settings) or
    UnsupportedModelError (keys that cannot be re-rotated) before anything
    is computed or cached.
    """
    start = (time.perf_counter(), time.process_time())
    blend = blend or BlendConfig()
    prompt = check_rag(engine, prompt, blend)
    num_computed = 0
    if blend.mode != "full":
        num_computed = ChunkStore(engine).ensure(stored_sequences(prompt, blend), cache_salt)
    added = add_rag_request(engine, prompt, params or SamplingParams(), blend, cache_salt)
    return _finish(engine, added, start, num_computed)


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


def _finish(engine: Engine, added: Added, start: tuple[float, float], num_computed: int) -> RagResult:
    """Step until the request finishes; release it (and so its context)."""
    seq = engine.sequences[added.seq_id]
    first_cpu = None
    while not seq.is_finished:
        engine.step()
        if engine.last_step_size == 0:
            raise RuntimeError("the engine can run none of its unfinished requests")
        if first_cpu is None and seq.first_token_time is not None:
            first_cpu = time.process_time()
    first = seq.first_token_time or seq.finish_time or time.perf_counter()
    first_cpu = first_cpu if first_cpu is not None else time.process_time()
    output = RequestOutput.of(engine.release(added.seq_id))
    ttft, ttft_cpu = first - start[0], first_cpu - start[1]
    return RagResult(
        output, ttft, ttft_cpu, added.num_reused_tokens, added.num_recomputed_tokens, num_computed
    )
