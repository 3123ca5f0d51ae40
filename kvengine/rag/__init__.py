"""Reuse of document chunks in any position of a prompt (CacheBlend-style RAG caching).

A chunk's keys and values are computed once, alone, at position 0, and kept by
the engine's prefix cache like any prefix (pool, tiers, per tenant): a chunk
computed alone at position 0 *is* a prefix. A prompt that holds the chunk
elsewhere gets its cached keys re-rotated to the new position (rotation.py),
a fraction of its tokens recomputed against the real context (blend.py), and
the assembled cache handed to the engine as a ready context
(`Engine.add_kv_context`), which computes the rest of the prompt and decodes.

This package is not the prefix cache (cache/prefix.py) and does not change how
the engine schedules; it runs before a request is queued: in the caller's
thread (`rag_generate`), or on the async engine's driver between steps
(serving.py, for the server's `kv_chunks`).
"""

from kvengine.rag.api import RagResult, rag_generate
from kvengine.rag.blend import BLEND_MODES, BlendConfig
from kvengine.rag.spans import RagPrompt, build_rag_prompt, check_spans

__all__ = [
    "BLEND_MODES",
    "BlendConfig",
    "RagPrompt",
    "RagResult",
    "build_rag_prompt",
    "check_spans",
    "rag_generate",
]
