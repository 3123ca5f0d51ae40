"""The chunk store: each chunk's keys and values at position 0, kept by the engine's prefix cache.

A chunk computed alone at position 0 is exactly a prefix, so the store adds
no cache of its own: a missing chunk is computed as a one-token request of
its tokens (the prefix cache keeps its whole blocks, and the tiers below it
get them as they get any prefix), and a cached one is read back through
`PrefixCache.attach` / `detach` under a private id, which also loads chunks
from the tiers. Keys carry the tenant's salt, so one tenant never reads
another's chunks. Only whole blocks are kept: a chunk's last
`len % block_size` tokens are computed again wherever the chunk is used.

The store never holds blocks between calls; what `fetch` returns is a copy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from kvengine.cache.prefix import PrefixCache
from kvengine.cache.prefix_key import PrefixKey
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError


@dataclass(frozen=True)
class ChunkKV:
    """The cached keys and values of a chunk's first `num_tokens` tokens, each `(L, H_kv, n, D)`, at positions 0.."""

    keys: torch.Tensor
    values: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.keys.shape[2])


class ChunkStore:
    """Reads and fills chunks' position-0 caches in one engine's prefix cache."""

    def __init__(self, engine: Engine) -> None:
        if engine.prefix is None:
            raise InvalidRequestError(
                "chunk reuse keeps chunks in the prefix cache: turn CacheConfig.prefix_cache on"
            )
        self.engine = engine
        self.prefix: PrefixCache = engine.prefix
        self._ids = itertools.count(-1, -1)  # private attach ids, never an engine request's
        self.num_computed_chunks = 0

    def cacheable_len(self, chunk_ids: list[int]) -> int:
        """Tokens of the chunk the store can keep: its whole blocks."""
        bs = self.engine.cache.block_size
        return len(chunk_ids) // bs * bs

    def ensure(self, chunks: list[list[int]], cache_salt: str) -> int:
        """Compute (in one batch) the chunks whose whole blocks are not all cached; returns how many."""
        missing = {
            tuple(c) for c in chunks if self.prefix.peek(PrefixKey(c, cache_salt)) < self.cacheable_len(c)
        }
        if missing:
            todo = [list(c) for c in sorted(missing)]
            self.engine.generate(todo, SamplingParams(max_tokens=1, ignore_eos=True), cache_salt=cache_salt)
            self.num_computed_chunks += len(todo)
        return len(missing)

    def fetch(self, chunk_ids: list[int], cache_salt: str) -> ChunkKV:
        """A copy of the cached position-0 keys and values of the chunk's longest cached prefix (maybe empty)."""
        seq_id = next(self._ids)
        key = PrefixKey(chunk_ids[: self.cacheable_len(chunk_ids)], cache_salt)
        hit = self.prefix.attach(seq_id, key)
        assert hit is not None  # plain keys always attach
        try:
            n = hit.num_tokens
            slots = hit.kv.slots[..., :n]  # (L, H, n)
            k, v = self.engine.pool.read(slots.flatten())
            shape = (*slots.shape, k.shape[-1])
            return ChunkKV(k.view(shape), v.view(shape))  # `read` made new tensors
        finally:
            self.prefix.detach(seq_id, hit.kv, PrefixKey([], cache_salt))
