"""The prefix cache in the engine: radix-tree values are blocks of the paged cache.

Glue between `RadixCache` (which prefixes are cached, which go first) and
`PagedKVCache` (which sequence holds which block). Blocks are per (layer,
kv-head), so the tree's value for one block-aligned chunk of `block_size`
tokens is the `(L, H_kv)` tensor of the block ids holding those tokens in
every cell.

Ownership. The tree holds one reference on every block it caches. A sequence
that reuses a cached prefix holds its own reference on those blocks and a lock
on the node where its match ends, so they cannot be evicted while it runs.
Hence every block of the pool is free, or held by sequences (and perhaps the
tree as well), or held by the tree alone; the last kind, exactly the blocks of
unlocked nodes, is what eviction can free (`check_ownership`).

The cache knows requests only by a `PrefixKey` (token ids, tenant salt,
press; tree keys and tenant namespaces are in prefix_key.py) and an id; it
never changes a request, it returns what it matched. Only plain keys (no
press) take part in the tree: a cache a press has compressed is not the keys
and values of its tokens, so it can neither serve nor reuse a prefix
(compressed contexts are kept whole, in compressed.py, behind the same
`attach`).

Tiers. With a `TierBridge`, chunks move below the pool: written when cached
(write-through) or when evicted (write-back), and loaded back when a
sequence is attached, from what `prefetch` read ahead when it arrived. What
was read ahead for a request is let go when it is attached or detached, or
by `cancel_prefetch` when it leaves before admission: none outlives it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import NamedTuple

import torch

from kvengine.cache.compressed import CompressedPrefixes
from kvengine.cache.paged import KVPool, PagedKVCache, SequenceKV
from kvengine.cache.policy import EvictionPolicy
from kvengine.cache.prefix_key import PrefixKey, TreeKeys
from kvengine.cache.radix import RadixCache, RadixNode
from kvengine.cache.tiered import Prefetch, TierBridge


class PrefixHit(NamedTuple):
    """What `attach` found: a cache for the request, holding its first `num_tokens` tokens."""

    kv: SequenceKV
    num_tokens: int


class PrefixCache:
    """Shares the full blocks of finished (or preempted) plain sequences with later ones."""

    def __init__(
        self,
        cache: PagedKVCache,
        model_name: str,
        policy: EvictionPolicy | str = "lru",
        tiers: TierBridge | None = None,
        write_back: bool = False,
    ) -> None:
        self.cache = cache
        self.tiers = tiers
        self.write_back = write_back
        self.compressed = CompressedPrefixes(cache, model_name, tiers)
        self.keys = TreeKeys(model_name, cache.block_size)
        self._chunk_keys: dict[int, str] = {}  # first block id of a cached chunk -> its chunk key
        self._prefetches: dict[int, Prefetch] = {}  # seq_id -> its chunks being read ahead
        self.model_name = model_name
        self.tree = RadixCache(cache.block_size, policy)
        self.cells = cache.num_layers * cache.num_kv_heads
        # seq_id -> (node its locked prefix ends at, tokens of that prefix)
        self._locks: dict[int, tuple[RadixNode, int]] = {}
        self.version = 0  # changes whenever what is cached changes (so may `peek`'s answers)
        self.num_hit_tokens = 0
        self.num_tier_hit_tokens = 0  # hit tokens whose blocks came from a tier
        self.num_evicted_blocks = 0

    @property
    def pool(self) -> KVPool:
        return self.cache.pool

    @property
    def num_evictable_blocks(self) -> int:
        """Pool blocks held by the tree alone: eviction can free all of them."""
        return self.tree.num_evictable_blocks * self.cells

    @property
    def num_locked_blocks(self) -> int:
        """Pool blocks of cached prefixes that running sequences reuse."""
        return self.tree.num_locked_blocks * self.cells

    def add_public_prefix(self, token_ids: list[int]) -> None:
        """Let every tenant share the cached whole blocks of these tokens (and nothing after them)."""
        self.keys.add_public(token_ids)
        self.version += 1

    def prefetch(self, seq_id: int, key: PrefixKey) -> None:
        """Start reading from the tiers the chunks of a plain key the tree lacks (when its request arrives)."""
        if self.tiers is None or key.press is not None:
            return
        namespace, tokens = self.keys.tree_key(key.token_ids, key.salt)
        num_matched = self.tree.match_prefix(tokens, namespace).num_tokens
        keys = self.tiers.chunk_keys(namespace, tokens)[num_matched // self.cache.block_size :]
        if keys:
            self.cancel_prefetch(seq_id)
            self._prefetches[seq_id] = self.tiers.prefetch(keys)

    def cancel_prefetch(self, seq_id: int) -> None:
        """Let go of what was read ahead for `seq_id` (a request that leaves before it is attached)."""
        prefetch = self._prefetches.pop(seq_id, None)
        if prefetch is not None and self.tiers is not None:
            self.tiers.release(prefetch)

    def peek(self, key: PrefixKey) -> int:
        """Tokens `attach` would reuse now for a plain key (0 for a compressed one); changes nothing.

        The answer holds until `version` changes.
        """
        if key.press is not None:
            return 0
        namespace, tokens = self.keys.tree_key(key.token_ids, key.salt)
        return self.tree.match_prefix(tokens, namespace).num_tokens

    def attach(self, seq_id: int, key: PrefixKey, max_load_blocks: int | None = None) -> PrefixHit | None:
        """A cache for the request `seq_id` being admitted, starting with what is cached for `key`.

        Plain key: the longest cached prefix of `key.token_ids` (perhaps
        empty); its blocks are shared (one more reference each) and locked
        until `detach(seq_id, ...)`. Chunks the tiers hold beyond it are
        loaded first, into at most `max_load_blocks` free blocks (default:
        all free ones): the caller keeps the blocks it promised elsewhere.
        Compressed key: a fork of the context kept for it (its press need
        not run again), or None if none is kept.
        """
        if key.press is not None:
            kv = self.compressed.attach(key.token_ids, key.salt, key.press, max_load_blocks)
            return None if kv is None else PrefixHit(kv, len(key.token_ids))
        namespace, tokens = self.keys.tree_key(key.token_ids, key.salt)
        free = self.pool.num_free_blocks
        self._load_from_tiers(seq_id, namespace, tokens, free if max_load_blocks is None else max_load_blocks)
        match = self.tree.match_prefix(tokens, namespace)
        self.tree.lock(match.last_node)
        self._locks[seq_id] = (match.last_node, match.num_tokens)
        if match.values:
            blocks = torch.stack(match.values, dim=2)  # (L, H_kv, n)
        else:
            blocks = torch.empty(self.cache.num_layers, self.cache.num_kv_heads, 0, dtype=torch.int64)
        self.num_hit_tokens += match.num_tokens
        return PrefixHit(self.cache.share_blocks(blocks), match.num_tokens)

    def locked_tokens(self, seq_id: int) -> int:
        """Tokens of the cached prefix the request `seq_id` holds under its lock (0: none)."""
        lock = self._locks.get(seq_id)
        return lock[1] if lock is not None else 0

    def publish(self, seq_id: int, kv: SequenceKV, key: PrefixKey) -> int:
        """Cache the whole blocks of a running plain request's computed prompt; returns pool blocks.

        `key.token_ids` are its computed tokens. Called once its prompt is
        computed, so that requests arriving while it decodes reuse the prompt.
        The blocks become the tree's too and stay locked by `seq_id` (the lock
        moves to where they end) until `detach`. Nothing is cached when
        another request cached more of this prompt since `seq_id` was
        attached: its blocks then differ from the tree's, and `detach` sorts
        that out.
        """
        lock = self._locks.get(seq_id)
        blocks, namespace, tokens = self._whole_blocks(kv, key)
        if lock is None or len(tokens) <= lock[1]:
            return 0
        if self.tree.match_prefix(tokens, namespace).num_tokens != lock[1]:
            return 0
        num_new = self._insert(blocks, namespace, tokens)
        last = self.tree.match_prefix(tokens, namespace).last_node
        self.tree.lock(last)
        self.tree.unlock(lock[0])
        self._locks[seq_id] = (last, len(tokens))
        return num_new * self.cells

    def detach(self, seq_id: int, kv: SequenceKV, key: PrefixKey) -> None:
        """Free an attached request's cache `kv`, keeping its whole computed blocks in the tree.

        `key.token_ids` are its computed tokens. The tree takes a reference on
        each block of a prefix it did not hold yet; then the request's own
        references are dropped (blocks nobody else holds go back to the pool)
        and its lock is released.
        """
        blocks, namespace, tokens = self._whole_blocks(kv, key)
        if tokens:
            self._insert(blocks, namespace, tokens)
        self.cache.free(kv)
        lock = self._locks.pop(seq_id, None)
        if lock is not None:
            self.tree.unlock(lock[0])
        self.cancel_prefetch(seq_id)

    def keep_compressed(self, kv: SequenceKV, key: PrefixKey) -> None:
        """Keep `kv`, a context `key.press` has just compressed, for later requests with the same key."""
        assert key.press is not None
        self.compressed.store(kv, key.token_ids, key.salt, key.press)

    def _whole_blocks(self, kv: SequenceKV, key: PrefixKey) -> tuple[torch.Tensor, Hashable, list[int]]:
        """The blocks `(L, H_kv, n)` of `kv` that are full and computed in every cell, and their tree key."""
        bs = self.cache.block_size
        blocks = self.cache.full_blocks(kv)
        num_blocks = min(blocks.shape[2], len(key.token_ids) // bs)
        namespace, tokens = self.keys.tree_key(key.token_ids[: num_blocks * bs], key.salt)
        return blocks[..., :num_blocks], namespace, tokens

    def _insert(self, blocks: torch.Tensor, namespace: Hashable, tokens: list[int]) -> int:
        """Cache `blocks` `(L, H_kv, n)` under `tokens`; returns how many chunks the tree lacked.

        The tree takes one reference on each block of those chunks (the last ones).
        """
        values = list(blocks.unbind(2))
        num_new = self.tree.insert(tokens, values, namespace) // self.cache.block_size
        if num_new:
            self.pool.incref(blocks[..., blocks.shape[2] - num_new :].flatten())
            self.version += 1
            self._remember(namespace, tokens, values, num_new, store=not self.write_back)
        return num_new

    def _remember(
        self, namespace: Hashable, tokens: list[int], values: list[torch.Tensor], num_new: int, store: bool
    ) -> None:
        """Note the chunk keys of the last `num_new` chunks just cached; store them if asked."""
        if self.tiers is None:
            return
        keys = self.tiers.chunk_keys(namespace, tokens)[-num_new:]
        new_values = values[-num_new:]
        for key, value in zip(keys, new_values, strict=True):
            self._chunk_keys[int(value[0, 0])] = key
        if store:
            self.tiers.store(keys, new_values)

    def _load_from_tiers(self, seq_id: int, namespace: Hashable, key: list[int], max_blocks: int) -> None:
        """Put the chunks of `key` the tree lacks and the tiers hold into the pool and the tree.

        Only into free blocks, at most `max_blocks` of them: loading never
        evicts. Chunks come in order and stop at the first one missing or
        failing its checks.
        """
        prefetch = self._prefetches.pop(seq_id, None)
        if self.tiers is None:
            return
        bs = self.cache.block_size
        all_keys = self.tiers.chunk_keys(namespace, key)
        num_matched = self.tree.match_prefix(key, namespace).num_tokens // bs
        room = max(0, min(max_blocks, self.pool.num_free_blocks))
        wanted = all_keys[num_matched : num_matched + room // self.cells]
        try:
            if prefetch is not None:
                prefetch.wait()
            chunks = self.tiers.fetch(wanted)
        finally:
            if prefetch is not None:
                self.tiers.release(prefetch)  # what it read beyond `wanted` is not kept
        if not chunks:
            return
        loaded = self.tiers.install(chunks)
        num_tokens = (num_matched + len(loaded)) * bs
        prefix = self.tree.match_prefix(key[:num_tokens], namespace)
        num_new = self.tree.insert(key[:num_tokens], [*prefix.values, *loaded], namespace) // bs
        assert num_new == len(loaded), "the tree changed while chunks were loaded"
        self._remember(namespace, key[:num_tokens], loaded, num_new, store=False)
        self.version += 1
        self.num_tier_hit_tokens += num_new * bs

    def close(self) -> None:
        """Flush and close the storage tiers below the pool."""
        if self.tiers is not None:
            self.tiers.close()

    def evict(self, num_blocks: int) -> int:
        """Evict cached prefixes until `num_blocks` pool blocks are freed or none is evictable.

        The tree's blocks go first, then kept compressed contexts. Returns the
        number of pool blocks freed.
        """
        if num_blocks <= 0:
            return 0
        freed = 0
        values = self.tree.evict(-(-num_blocks // self.cells))
        if values:
            if self.tiers is not None:
                keys = [self._chunk_keys.pop(int(value[0, 0]), None) for value in values]
                if self.write_back:
                    kept = [(k, v) for k, v in zip(keys, values, strict=True) if k is not None]
                    self.tiers.store([k for k, _ in kept], [v for _, v in kept])
            ids = torch.stack(values).flatten()
            self.pool.release(ids)  # unlocked nodes' blocks are the tree's alone: freed here
            self.version += 1
            self.num_evicted_blocks += ids.numel()
            freed = ids.numel()
        if freed < num_blocks:
            freed += self.compressed.evict(num_blocks - freed)
        return freed

    def cached_block_ids(self, locked: bool | None = None) -> torch.Tensor:
        """Pool block ids the tree holds (only those of locked or unlocked nodes, if asked)."""
        chunks = [
            torch.stack(node.values).flatten()
            for node in self.tree.nodes()
            if locked is None or (node.lock_ref > 0) == locked
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)

    def stats(self) -> dict[str, float]:
        """Gauges and counters for metrics: its own, its compressed contexts' and its tiers'."""
        stats: dict[str, float] = {
            "pool_blocks_cached": self.num_evictable_blocks,
            "prefix_hit_tokens_total": self.num_hit_tokens,
            "prefix_tier_hit_tokens_total": self.num_tier_hit_tokens,
            "prefix_evicted_blocks_total": self.num_evicted_blocks,
            **self.compressed.stats(),
        }
        if self.tiers is not None:
            stats.update(self.tiers.stats())
        return stats


def check_ownership(pool: KVPool, holders: Iterable[SequenceKV], prefix: PrefixCache | None) -> None:
    """Raise AssertionError unless every block's ref count is exactly its holders'.

    `holders` are the caches of every sequence that holds blocks (running
    sequences and kept contexts); the prefix cache's kept compressed contexts
    are added here. Checks: each reference is a block-table
    entry of a holder or a tree value; no block is cached twice; a locked
    node's blocks are held by a sequence, an unlocked node's by the tree
    alone; so free + evictable + held by sequences = all blocks.
    """
    pool.check_invariants()
    refs = torch.zeros(pool.num_blocks, dtype=torch.int64)
    kept = prefix.compressed.holders() if prefix is not None else []
    for kv in [*holders, *kept]:
        ids = kv.block_table[kv.block_table >= 0]
        refs.index_add_(0, ids, torch.ones_like(ids))
    held = refs > 0
    num_evictable = 0
    if prefix is not None:
        prefix.tree.check_invariants()
        cached = prefix.cached_block_ids()
        assert cached.numel() == cached.unique().numel(), "a block is cached twice"
        refs.index_add_(0, cached, torch.ones_like(cached))
        locked, evictable = prefix.cached_block_ids(locked=True), prefix.cached_block_ids(locked=False)
        assert bool(held[locked].all()), "a locked cached block is held by no sequence"
        assert not bool(held[evictable].any()), "an unlocked cached block is held by a sequence"
        assert evictable.numel() == prefix.num_evictable_blocks
        assert locked.numel() == prefix.num_locked_blocks
        num_evictable = evictable.numel()
    assert torch.equal(refs, pool.ref_counts.long()), "ref counts disagree with block tables and the tree"
    assert pool.num_free_blocks + num_evictable + int(held.sum()) == pool.num_blocks
