"""A RAG request through the asyncio front (`AsyncEngine`): what the server runs for `kv_chunks`.

Assembling a context runs the model's own forward passes under another
attention implementation (dense.py), so it must never overlap an engine step.
`add_rag` therefore works in two calls on the engine's driver, between steps
(`AsyncEngine.add_with`):

1. the prompt is checked (nothing is queued if it is refused) and a one-token
   request is queued for each chunk the store lacks; these run in ordinary
   steps, batched with everything else, and leave their chunks in the prefix
   cache (under the request's tenant salt) when they finish;
2. once they have, the context is assembled in a worker thread while the
   driver waits for it, and the request that continues it is queued; its id
   is streamed like any other.

This module knows nothing of HTTP; the server calls `add_rag` from its admit path.
"""

from __future__ import annotations

import contextlib

from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.rag.api import add_rag_request, check_rag, queue_chunks
from kvengine.rag.blend import BlendConfig
from kvengine.rag.spans import RagPrompt


async def add_rag(
    llm: AsyncEngine, prompt: RagPrompt, params: SamplingParams, blend: BlendConfig, cache_salt: str = ""
) -> int:
    """Queue a RAG request on `llm`'s engine; its id once queued (stream it with `llm.stream`).

    Raises InvalidRequestError / UnsupportedModelError for a refused prompt
    (before anything is computed or cached), RuntimeError if the engine is
    closed, or the error that ended a chunk's request.
    """

    def fill(engine: Engine) -> list[int]:
        checked = check_rag(engine, prompt, blend)
        return [] if blend.mode == "full" else queue_chunks(engine, checked, blend, cache_salt)

    chunk_ids = await llm.add_with(fill)
    try:
        for seq_id in chunk_ids:
            await _drain(llm, seq_id)
    except BaseException:  # the caller went away, or a chunk failed: none of them is wanted now
        for seq_id in chunk_ids:
            llm.abort(seq_id)
        raise

    def add(engine: Engine) -> list[int]:
        checked = check_rag(engine, prompt, blend)  # again: the engine may have changed meanwhile
        return [add_rag_request(engine, checked, params, blend, cache_salt).seq_id]

    (seq_id,) = await llm.add_with(add, in_thread=blend.mode != "full")
    return seq_id


async def _drain(llm: AsyncEngine, seq_id: int) -> None:
    """Wait for a chunk's request to end (its one token is not wanted); closing early aborts it."""
    async with contextlib.aclosing(llm.stream(seq_id)) as events:
        async for _ in events:
            pass
