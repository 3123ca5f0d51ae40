"""The chunk store: each chunk's keys and values at position 0, kept by the engine's prefix cache.

A chunk computed alone at position 0 is exactly a prefix, so the store adds
no cache of its own: a missing chunk is computed as a one-token request of
its tokens (the prefix cache keeps its whole blocks, and the tiers below it
get them as they get any prefix), and a cached one is read back through
`PrefixCache.attach` / `detach` under a private id, which also loads chunks
from the tiers. Keys carry the tenant's salt, so one tenant never reads
another's chunks. Only whole blocks are kept: a chunk's last
`len % block_size` tokens are computed again wherever the chunk is used.
A chunk computed after an anchor (blend.py's `anchor`) is kept as the
sequence anchor + chunk, and read back without the anchor's tokens.

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

_FILL = SamplingParams(max_tokens=1, ignore_eos=True)  # a chunk's request: its prompt is what is kept


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
                "chunk reuse keeps chunks in the prefix cache: turn CacheConfig.prefix_cache on "
                "(kvengine serve --prefix-cache)",
                param="kv_chunks",
            )
        self.engine = engine
        self.prefix: PrefixCache = engine.prefix
        self._ids = itertools.count(-1, -1)  # private attach ids, never an engine request's
        self.num_computed_chunks = 0

    def cacheable_len(self, chunk_ids: list[int]) -> int:
        """Tokens of the chunk the store can keep: its whole blocks."""
        bs = self.engine.cache.block_size
        return len(chunk_ids) // bs * bs

    def missing(self, chunks: list[list[int]], cache_salt: str) -> list[list[int]]:
        """The distinct chunks whose whole blocks are not all cached (for this tenant), in a fixed order."""
        found = {
            tuple(c) for c in chunks if self.prefix.peek(PrefixKey(c, cache_salt)) < self.cacheable_len(c)
        }
        return [list(c) for c in sorted(found)]

    def ensure(self, chunks: list[list[int]], cache_salt: str) -> int:
        """Compute (in one batch, stepping the engine) the chunks not all cached; returns how many."""
        todo = self.missing(chunks, cache_salt)
        if todo:
            self.engine.generate(todo, _FILL, cache_salt=cache_salt)
            self.num_computed_chunks += len(todo)
        return len(todo)

    def queue(self, chunks: list[list[int]], cache_salt: str) -> list[int]:
        """Queue a one-token request per chunk not all cached, without stepping; their ids.

        The chunks are cached when those requests finish. If one is refused, none is left queued.
        """
        ids: list[int] = []
        try:
            for chunk in self.missing(chunks, cache_salt):
                ids.append(self.engine.add_request(chunk, _FILL, cache_salt=cache_salt))
        except InvalidRequestError:
            for seq_id in ids:
                self.engine.abort(seq_id)
                self.engine.release(seq_id)
            raise
        self.num_computed_chunks += len(ids)
        return ids

    def fetch(self, chunk_ids: list[int], cache_salt: str, skip: int = 0) -> ChunkKV:
        """A copy of the cached keys and values of the chunk's longest cached prefix (maybe empty).

        With `skip`, the first `skip` tokens (an anchor the chunk was computed
        after) are left out: the copy holds tokens `skip..`, at positions `skip..`.
        """
        seq_id = next(self._ids)
        key = PrefixKey(chunk_ids[: self.cacheable_len(chunk_ids)], cache_salt)
        hit = self.prefix.attach(seq_id, key)
        assert hit is not None  # plain keys always attach
        try:
            n = hit.num_tokens
            slots = hit.kv.slots[..., min(skip, n) : n]  # (L, H, n - skip)
            k, v = self.engine.pool.read(slots.flatten())
            shape = (*slots.shape, k.shape[-1])
            return ChunkKV(k.view(shape), v.view(shape))  # `read` made new tensors
        finally:
            self.prefix.detach(seq_id, hit.kv, PrefixKey([], cache_salt))
