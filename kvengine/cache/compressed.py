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
block table, per-head lengths and token positions) and loaded back on a miss
in memory.

This module knows nothing about sequences or scheduling: it is given token
ids, a salt and a press's repr, and returns caches. `PrefixCache` owns it and
is its only caller.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch

from kvengine.cache.blob import BlobError, KeyMismatchError
from kvengine.cache.paged import PagedKVCache, SequenceKV
from kvengine.cache.pool import KVPool
from kvengine.cache.tiered import TierBridge

KEY_VERSION = "kvengine-compressed-v1"


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
    def _pool(self) -> KVPool:
        pool = self.cache.pool
        assert not pool.seals_blocks  # CacheConfig refuses the prefix cache with packed KIVI blocks
        return pool

    def key(self, context_ids: list[int], salt: str, press: str) -> str:
        """The entry key of a context compressed by `press` (its repr) for the tenant `salt`."""
        layout = (
            self.cache.num_layers,
            self.cache.num_kv_heads,
            self.cache.block_size,
            str(self.cache.pool.dtype),
        )
        text = repr((KEY_VERSION, self.model_name, layout, press, salt, tuple(context_ids)))
        return hashlib.sha256(text.encode()).hexdigest()

    def attach(
        self, context_ids: list[int], salt: str, press: str, max_load_blocks: int | None = None
    ) -> SequenceKV | None:
        """A fork of the compressed context kept here (or in a tier) for this key, or None.

        None also when the pool cannot take the fork's copies of partly filled
        blocks. A context loaded from a tier takes at most `max_load_blocks`
        free blocks (default: any), or is not loaded.
        """
        key = self.key(context_ids, salt, press)
        kv = self.entries.get(key)
        if kv is None and self.tiers is not None:
            kv = self._load(
                key, self.cache.pool.num_free_blocks if max_load_blocks is None else max_load_blocks
            )
        if kv is None:
            return None
        if not self.cache.pool.can_allocate(_partial_blocks(kv, self.cache.block_size)):
            return None
        self.entries.move_to_end(key)
        self.num_hits += 1
        return self.cache.fork(kv)

    def store(self, kv: SequenceKV, context_ids: list[int], salt: str, press: str) -> None:
        """Keep (a fork of) `kv`, the cache of `context_ids` just compressed by `press`."""
        key = self.key(context_ids, salt, press)
        if key in self.entries or not self.cache.pool.can_allocate(
            _partial_blocks(kv, self.cache.block_size)
        ):
            return
        entry = self.entries[key] = self.cache.fork(kv)
        self.num_stores += 1
        if self.tiers is not None:
            self.tiers.store_blob(_storage_key(key), {"kind": "compressed", "key": key}, self._pack(entry))

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
        """An entry as tensors: its blocks' keys and values, a block table into them, and the
        position of each cached token (sliding windows compare them)."""
        used = kv.block_table >= 0
        ids = kv.block_table[used]
        table = torch.full_like(kv.block_table, -1)
        table[used] = torch.arange(ids.numel())
        k, v = self._pool.read_blocks(ids)  # (n, block_size, D)
        width = int(kv.lens.max())
        return {
            "table": table,
            "lens": kv.lens.clone(),
            "positions": kv.positions[..., :width].clone(),
            "k": k,
            "v": v,
        }

    def _load(self, key: str, max_blocks: int) -> SequenceKV | None:
        assert self.tiers is not None
        blob = self.tiers.read_blob(_storage_key(key), {"kind": "compressed", "key": key})
        if blob is None:
            return None
        try:
            table, lens, positions, k, v = self._check(blob)
        except BlobError as exc:
            self.tiers.reject(_storage_key(key), exc)
            return None
        pool = self._pool
        if k.shape[0] > max_blocks or not pool.can_allocate(k.shape[0]):
            return None
        ids = pool.allocate(k.shape[0])
        pool.write_blocks(ids, k, v)
        table = torch.where(table >= 0, ids[table.clamp_min(0)], -1)
        kv = self.entries[key] = self.cache.adopt(table, lens, positions)
        return kv

    def _check(self, blob: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The entry's tensors, if their shapes and dtypes fit this cache; else KeyMismatchError."""
        cells = (self.cache.num_layers, self.cache.num_kv_heads)
        pool, bs = self.cache.pool, self.cache.block_size
        table, lens, positions, k, v = (blob.get(name) for name in ("table", "lens", "positions", "k", "v"))
        ok = (
            table is not None
            and lens is not None
            and positions is not None
            and positions.dtype == torch.int64
            and tuple(positions.shape) == (*cells, int(lens.max()) if lens.numel() else 0)
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
        assert table is not None and lens is not None and positions is not None
        assert k is not None and v is not None
        return table, lens, positions, k, v

    def stats(self) -> dict[str, float]:
        """Gauges and counters for metrics: entries held, and hits, stores and evictions so far."""
        return {
            "compressed_prefix_entries": len(self.entries),
            "compressed_prefix_hits_total": self.num_hits,
            "compressed_prefix_stores_total": self.num_stores,
            "compressed_prefix_evictions_total": self.num_evictions,
        }


def _partial_blocks(kv: SequenceKV, block_size: int) -> int:
    """Blocks a fork of `kv` copies: each cell's partly filled last block."""
    return int(((kv.lens % block_size != 0) & (kv.num_blocks > 0)).sum())


def _storage_key(key: str) -> str:
    return f"kvengine:compressed:{key}"
