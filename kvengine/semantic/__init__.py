"""A semantic response cache with a user-set error bound (VectorQ / vCache).

A prompt close in meaning to one already answered gets the cached answer,
when the similarity reaches a threshold learned online from verified hits
and misses so that at most `max_error` of the reused answers are wrong
(at a stated confidence). Opt-in per request and per tenant.

- pairs.py: labelled paraphrase / near-miss prompts generated from templates
- embedder.py: prompt embeddings (the served model's hidden states, its input
  embeddings, or hashed n-grams), registry `EMBEDDERS`
- index.py: nearest-neighbour search (brute force, faiss flat, faiss HNSW), registry `INDEXES`
- thresholds.py: certified thresholds and the policies choosing them, registry `THRESHOLD_POLICIES`
- cache.py: `SemanticCache`, lookups and records per tenant

The server's use of it (request field, response flag, metrics) is
kvengine/server/semantic_cache.py.
"""

from kvengine.semantic.cache import Lookup, SemanticCache, SemanticCacheConfig
from kvengine.semantic.embedder import EMBEDDERS, make_embedder
from kvengine.semantic.index import INDEXES, make_index
from kvengine.semantic.thresholds import THRESHOLD_POLICIES, certified_threshold, make_policy

__all__ = [
    "EMBEDDERS",
    "INDEXES",
    "THRESHOLD_POLICIES",
    "Lookup",
    "SemanticCache",
    "SemanticCacheConfig",
    "certified_threshold",
    "make_embedder",
    "make_index",
    "make_policy",
]
