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

Only plain sequences take part (`Sequence.is_plain`): a cache a press has
compressed is not the keys and values of its tokens, so it can neither serve
nor reuse a prefix. Keys are namespaced by the model and the request's tenant
salt: one tenant's prompts never speed up another's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from kvengine.cache.paged import KVPool, PagedKVCache, SequenceKV
from kvengine.cache.policy import EvictionPolicy
from kvengine.cache.radix import RadixCache, RadixNode
from kvengine.engine.request import Sequence


class PrefixCache:
    """Shares the full blocks of finished (or preempted) plain sequences with later ones."""

    def __init__(self, cache: PagedKVCache, model_name: str, policy: EvictionPolicy | str = "lru") -> None:
        self.cache = cache
        self.model_name = model_name
        self.tree = RadixCache(cache.block_size, policy)
        self.cells = cache.num_layers * cache.num_kv_heads
        self._locks: dict[int, RadixNode] = {}  # seq_id -> node its matched prefix ends at
        # `peek` is asked about every waiting sequence at every step: remember its
        # answers until what is cached changes.
        self._version = 0
        self._peeks: dict[int, tuple[int, int]] = {}  # seq_id -> (version, matched tokens)
        self.num_hit_tokens = 0
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

    def namespace(self, seq: Sequence) -> tuple[str, str]:
        return (self.model_name, seq.cache_salt)

    @staticmethod
    def _key(seq: Sequence) -> list[int]:
        # The last token is always computed again: its logits give the next token.
        return seq.token_ids[: seq.num_tokens - 1]

    def peek(self, seq: Sequence) -> int:
        """Tokens `attach(seq)` would reuse now; 0 for a sequence that is not plain."""
        if not seq.is_plain:
            return 0
        seen = self._peeks.get(seq.seq_id)
        if seen is not None and seen[0] == self._version:
            return seen[1]
        num_tokens = self.tree.match_prefix(self._key(seq), self.namespace(seq)).num_tokens
        self._peeks[seq.seq_id] = (self._version, num_tokens)
        return num_tokens

    def attach(self, seq: Sequence) -> None:
        """Give a plain sequence without a cache one that starts with its longest cached prefix.

        The matched blocks are shared (one more reference each) and locked
        until `detach(seq)`; `seq.num_computed` and `seq.num_cached_tokens`
        become the number of matched tokens.
        """
        if not seq.is_plain or seq.kv is not None:
            raise ValueError(f"sequence {seq.seq_id} is not a plain sequence waiting for a cache")
        match = self.tree.match_prefix(self._key(seq), self.namespace(seq))
        self.tree.lock(match.last_node)
        self._locks[seq.seq_id] = match.last_node
        if match.values:
            blocks = torch.stack(match.values, dim=2)  # (L, H_kv, n)
        else:
            blocks = torch.empty(self.cache.num_layers, self.cache.num_kv_heads, 0, dtype=torch.int64)
        seq.kv = self.cache.share_blocks(blocks)
        seq.num_computed = seq.num_cached_tokens = match.num_tokens
        self.num_hit_tokens += match.num_tokens
        self._peeks.pop(seq.seq_id, None)

    def detach(self, seq: Sequence) -> None:
        """Free an attached sequence's cache, keeping its full blocks in the tree.

        The tree takes a reference on each block of a prefix it did not hold
        yet; then the sequence's own references are dropped (blocks nobody
        else holds go back to the pool) and its lock is released.
        """
        assert seq.kv is not None
        blocks = self.cache.full_blocks(seq.kv)  # (L, H_kv, n)
        num_blocks = min(blocks.shape[2], seq.num_computed // self.cache.block_size)
        if num_blocks:
            tokens = seq.token_ids[: num_blocks * self.cache.block_size]
            values = list(blocks[..., :num_blocks].unbind(2))
            num_new = self.tree.insert(tokens, values, self.namespace(seq)) // self.cache.block_size
            if num_new:
                self.pool.incref(blocks[..., num_blocks - num_new : num_blocks].flatten())
                self._version += 1
        self.cache.free(seq.kv)
        node = self._locks.pop(seq.seq_id, None)
        if node is not None:
            self.tree.unlock(node)
        self._peeks.pop(seq.seq_id, None)

    def close(self) -> None:
        """Flush and close the storage tiers below the pool."""

    def evict(self, num_blocks: int) -> int:
        """Evict cached prefixes until `num_blocks` pool blocks are freed or none is evictable.

        Returns the number of pool blocks freed (a multiple of the cells per block chunk).
        """
        if num_blocks <= 0:
            return 0
        values = self.tree.evict(-(-num_blocks // self.cells))
        if not values:
            return 0
        ids = torch.stack(values).flatten()
        self.pool.release(ids)  # unlocked nodes' blocks are the tree's alone: freed here
        self._version += 1
        self.num_evicted_blocks += ids.numel()
        return ids.numel()

    def cached_block_ids(self, locked: bool | None = None) -> torch.Tensor:
        """Pool block ids the tree holds (only those of locked or unlocked nodes, if asked)."""
        chunks = [
            torch.stack(node.values).flatten()
            for node in self.tree.nodes()
            if locked is None or (node.lock_ref > 0) == locked
        ]
        return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int64)


def check_ownership(pool: KVPool, holders: Iterable[SequenceKV], prefix: PrefixCache | None) -> None:
    """Raise AssertionError unless every block's ref count is exactly its holders'.

    `holders` are the caches of every sequence that holds blocks (running
    sequences and kept contexts). Checks: each reference is a block-table
    entry of a holder or a tree value; no block is cached twice; a locked
    node's blocks are held by a sequence, an unlocked node's by the tree
    alone; so free + evictable + held by sequences = all blocks.
    """
    pool.check_invariants()
    refs = torch.zeros(pool.num_blocks, dtype=torch.int64)
    for kv in holders:
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
