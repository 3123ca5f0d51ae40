"""Compressed contexts kept once and reused: the prefix cache for requests with a press.

A context compressed query-agnostically is a function of the model, the
press (its class and every hyperparameter) and the context's tokens, and
nothing else: the question is not seen. So the compressed cache of one
request serves every later request with the same context, press and tenant
salt, which then skips both the prefill and the compression of its context
(kvpress's most asked-for feature, issue #170 there).

An entry is a fork of the request's cache taken right after compression
(full blocks shared by reference), keyed by a hash of all of the above. A
hit gives the new request a fork of the entry. Entries are evicted least
recently used first when the pool is short, after the radix tree's blocks.
With tiers, an entry is also stored below the pool as one blob (its blocks,
block table and per-head lengths) and loaded back on a miss in memory.

This module knows nothing about scheduling: `PrefixCache` owns it, the
scheduler calls `attach`, the engine calls `store`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from kvengine.cache.blob import BlobError, KeyMismatchError
from kvengine.cache.paged import PagedKVCache, SequenceKV
from kvengine.cache.pool import BlockPool
from kvengine.engine.request import Sequence
from kvengine.engine.tiered import TierBridge

KEY_VERSION = "kvengine-compressed-v1"


def reuses_compressed(seq: Sequence) -> bool:
    """True for a request whose compressed context can be kept and reused."""
    return seq.press is not None and seq.parent is None and not seq.keep_queries


class CompressedPrefixes:
    """Compressed contexts by (model, press, salt, context tokens), LRU in memory, optionally in tiers."""

    def __init__(self, cache: PagedKVCache, model_name: str, tiers: TierBridge | None = None) -> None:
        self.cache = cache
        self.model_name = model_name
        self.tiers = tiers
        self.entries: OrderedDict[str, SequenceKV] = OrderedDict()
        self.num_hits = 0
        self.num_stores = 0
        self.num_evictions = 0

    @property
    def _pool(self) -> BlockPool:
        pool = self.cache.pool
        assert isinstance(pool, BlockPool)  # CacheConfig refuses the prefix cache with packed KIVI blocks
        return pool

    def key(self, seq: Sequence) -> str:
        layout = (
            self.cache.num_layers,
            self.cache.num_kv_heads,
            self.cache.block_size,
            str(self.cache.pool.dtype),
        )
        context = tuple(seq.prompt_ids[: seq.context_len])
        text = repr((KEY_VERSION, self.model_name, layout, repr(seq.press), seq.cache_salt, context))
        return hashlib.sha256(text.encode()).hexdigest()

    def attach(self, seq: Sequence) -> bool:
        """Give `seq` a fork of its compressed context if one is kept here or in a tier.

        On a hit `seq.num_computed`, `seq.num_cached_tokens` become its
        `context_len` and `seq.compressed` is set: its press does not run.
        """
        if not reuses_compressed(seq) or seq.kv is not None:
            return False
        key = self.key(seq)
        kv = self.entries.get(key)
        if kv is None and self.tiers is not None:
            kv = self._load(key)
        if kv is None:
            return False
        if not self.cache.pool.can_allocate(_partial_blocks(kv, self.cache.block_size)):
            return False
        self.entries.move_to_end(key)
        seq.kv = self.cache.fork(kv)
        seq.num_computed = seq.num_cached_tokens = seq.context_len
        seq.compressed = True
        self.num_hits += 1
        return True

    def store(self, seq: Sequence) -> None:
        """Keep the compressed context of `seq`, which has just been compressed."""
        assert seq.kv is not None and seq.compressed and seq.num_computed == seq.context_len
        key = self.key(seq)
        if key in self.entries or not self.cache.pool.can_allocate(
            _partial_blocks(seq.kv, self.cache.block_size)
        ):
            return
        kv = self.entries[key] = self.cache.fork(seq.kv)
        self.num_stores += 1
        if self.tiers is not None:
            self.tiers.store_blob(_storage_key(key), {"kind": "compressed", "key": key}, self._pack(kv))

    def evict(self, num_blocks: int) -> int:
        """Drop least recently used entries until `num_blocks` pool blocks are free again."""
        pool = self.cache.pool
        before = pool.num_free_blocks
        while self.entries and pool.num_free_blocks - before < num_blocks:
            _, kv = self.entries.popitem(last=False)
            self.cache.free(kv)
            self.num_evictions += 1
        return pool.num_free_blocks - before

    def holders(self) -> list[SequenceKV]:
        return list(self.entries.values())

    # ---- tiers ------------------------------------------------------------------

    def _pack(self, kv: SequenceKV) -> dict[str, torch.Tensor]:
        """An entry as tensors: its blocks' keys and values, and a block table into them."""
        used = kv.block_table >= 0
        ids = kv.block_table[used]
        table = torch.full_like(kv.block_table, -1)
        table[used] = torch.arange(ids.numel())
        k, v = self._pool.read_blocks(ids)  # (n, block_size, D)
        return {"table": table, "lens": kv.lens.clone(), "k": k, "v": v}

    def _load(self, key: str) -> SequenceKV | None:
        assert self.tiers is not None
        blob = self.tiers.read_blob(_storage_key(key), {"kind": "compressed", "key": key})
        if blob is None:
            return None
        try:
            table, lens, k, v = self._check(blob)
        except BlobError as exc:
            self.tiers.reject(_storage_key(key), exc)
            return None
        pool = self._pool
        if not pool.can_allocate(k.shape[0]):
            return None
        ids = pool.allocate(k.shape[0])
        pool.write_blocks(ids, k, v)
        kv = self.entries[key] = self.cache.adopt(torch.where(table >= 0, ids[table.clamp_min(0)], -1), lens)
        return kv

    def _check(self, blob: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The entry's tensors, if their shapes and dtypes fit this cache; else KeyMismatchError."""
        cells = (self.cache.num_layers, self.cache.num_kv_heads)
        pool, bs = self.cache.pool, self.cache.block_size
        table, lens, k, v = (blob.get(name) for name in ("table", "lens", "k", "v"))
        ok = (
            table is not None
            and lens is not None
            and k is not None
            and v is not None
            and tuple(table.shape[:2]) == cells
            and tuple(lens.shape) == cells
            and k.shape == v.shape == (k.shape[0], bs, pool.head_dim)
            and k.dtype == v.dtype == pool.dtype
            and table.dtype == lens.dtype == torch.int64
            and (table.numel() == 0 or int(table.max()) < k.shape[0])
            and bool((lens <= (table >= 0).sum(-1) * bs).all())
        )
        if not ok:
            raise KeyMismatchError("a compressed entry whose shapes do not fit this cache")
        assert table is not None and lens is not None and k is not None and v is not None
        return table, lens, k, v


def _partial_blocks(kv: SequenceKV, block_size: int) -> int:
    """Blocks a fork of `kv` copies: each cell's partly filled last block."""
    return int(((kv.lens % block_size != 0) & (kv.num_blocks > 0)).sum())


def _storage_key(key: str) -> str:
    return f"kvengine:compressed:{key}"
