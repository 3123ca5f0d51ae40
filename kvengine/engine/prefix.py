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
nor reuse a prefix (compressed contexts are kept whole, in compressed.py).
Keys are namespaced by the model and the request's tenant salt: one tenant's
prompts never speed up another's. A public prefix (`add_public_prefix`, e.g.
a shared system prompt) is the one exception: the whole blocks a prompt
shares with it are keyed without a salt, and every later token is salted
into its key, so tenants share exactly the public text and nothing after it.

Tiers. With a `TierBridge`, chunks move below the pool: written when cached
(write-through) or when evicted (write-back), and loaded back when a
sequence is attached, from what `prefetch` read ahead when it arrived.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from concurrent.futures import Future

import torch

from kvengine.cache.paged import KVPool, PagedKVCache, SequenceKV
from kvengine.cache.policy import EvictionPolicy
from kvengine.cache.radix import RadixCache, RadixNode
from kvengine.engine.compressed import CompressedPrefixes
from kvengine.engine.request import Sequence
from kvengine.engine.tiered import TierBridge

PUBLIC = "public"  # the salt of public prefixes' blocks


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
        self._public: list[tuple[int, ...]] = []
        self._chunk_keys: dict[int, str] = {}  # first block id of a cached chunk -> its chunk key
        self._prefetches: dict[int, Future[None]] = {}  # seq_id -> its chunks being read ahead
        self.model_name = model_name
        self.tree = RadixCache(cache.block_size, policy)
        self.cells = cache.num_layers * cache.num_kv_heads
        self._locks: dict[int, RadixNode] = {}  # seq_id -> node its matched prefix ends at
        # `peek` is asked about every waiting sequence at every step: remember its
        # answers until what is cached changes.
        self._version = 0
        self._peeks: dict[int, tuple[int, int]] = {}  # seq_id -> (version, matched tokens)
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
        self._public.append(tuple(token_ids))
        self._version += 1

    def _public_len(self, tokens: list[int]) -> int:
        """Tokens of the longest run of whole blocks that `tokens` share with a public prefix."""
        best = 0
        for public in self._public:
            n = 0
            for a, b in zip(tokens, public, strict=False):
                if a != b:
                    break
                n += 1
            best = max(best, n)
        return best - best % self.cache.block_size

    def tree_key(self, seq: Sequence, num_tokens: int) -> tuple[Hashable, list[int]]:
        """The namespace and tree key of the first `num_tokens` tokens of `seq`.

        Without a public prefix: the tokens, under (model, salt). With one:
        the public blocks as they are, then every token salted (a 128-bit hash
        of the salt above its 32 bits), under (model, PUBLIC).
        """
        tokens = seq.token_ids[:num_tokens]
        num_public = self._public_len(tokens) if self._public else 0
        if num_public == 0:
            return (self.model_name, seq.cache_salt), tokens
        salt = int.from_bytes(hashlib.sha256(seq.cache_salt.encode()).digest()[:16], "big") << 32
        return (self.model_name, PUBLIC), tokens[:num_public] + [t | salt for t in tokens[num_public:]]

    def _key(self, seq: Sequence) -> tuple[Hashable, list[int]]:
        # The last token is always computed again: its logits give the next token.
        return self.tree_key(seq, seq.num_tokens - 1)

    def prefetch(self, seq: Sequence) -> None:
        """Start reading from the tiers the chunks of `seq` the tree lacks (when it arrives)."""
        if self.tiers is None or not seq.is_plain:
            return
        namespace, key = self._key(seq)
        num_matched = self.tree.match_prefix(key, namespace).num_tokens
        keys = self.tiers.chunk_keys(namespace, key)[num_matched // self.cache.block_size :]
        if keys:
            self._prefetches[seq.seq_id] = self.tiers.prefetch(keys)

    def peek(self, seq: Sequence) -> int:
        """Tokens `attach(seq)` would reuse now; 0 for a sequence that is not plain."""
        if not seq.is_plain:
            return 0
        seen = self._peeks.get(seq.seq_id)
        if seen is not None and seen[0] == self._version:
            return seen[1]
        namespace, key = self._key(seq)
        num_tokens = self.tree.match_prefix(key, namespace).num_tokens
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
        namespace, key = self._key(seq)
        self._load_from_tiers(seq, namespace, key)
        match = self.tree.match_prefix(key, namespace)
        self.tree.lock(match.last_node)
        self._locks[seq.seq_id] = match.last_node
        if match.values:
            blocks = torch.stack(match.values, dim=2)  # (L, H_kv, n)
        else:
            blocks = torch.empty(self.cache.num_layers, self.cache.num_kv_heads, 0, dtype=torch.int64)
        seq.kv = self.cache.share_blocks(blocks)
        seq.num_computed = seq.num_cached_tokens = seq.num_locked_tokens = match.num_tokens
        self.num_hit_tokens += match.num_tokens
        self._peeks.pop(seq.seq_id, None)

    def publish(self, seq: Sequence) -> int:
        """Cache the whole blocks of a running plain sequence's computed prompt; returns pool blocks.

        Called once its prompt is computed, so that requests arriving while it
        decodes reuse the prompt. The blocks become the tree's too and stay
        locked by `seq` (the lock moves to where they end) until `detach`.
        Nothing is cached when another sequence cached more of this prompt
        since `seq` was attached: its blocks then differ from the tree's, and
        `detach` sorts that out.
        """
        assert seq.kv is not None and seq.is_plain
        node = self._locks.get(seq.seq_id)
        bs = self.cache.block_size
        blocks = self.cache.full_blocks(seq.kv)
        num_blocks = min(blocks.shape[2], seq.num_computed // bs)
        if node is None or num_blocks * bs <= seq.num_locked_tokens:
            return 0
        namespace, tokens = self.tree_key(seq, num_blocks * bs)
        if self.tree.match_prefix(tokens, namespace).num_tokens != seq.num_locked_tokens:
            return 0
        values = list(blocks[..., :num_blocks].unbind(2))
        num_new = self.tree.insert(tokens, values, namespace) // bs
        self.pool.incref(blocks[..., num_blocks - num_new : num_blocks].flatten())
        self._remember(namespace, tokens, values, num_new, store=not self.write_back)
        self._version += 1
        last = self.tree.match_prefix(tokens, namespace).last_node
        self.tree.lock(last)
        self.tree.unlock(node)
        self._locks[seq.seq_id] = last
        seq.num_locked_tokens = num_blocks * bs
        return num_new * self.cells

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
            namespace, tokens = self.tree_key(seq, num_blocks * self.cache.block_size)
            values = list(blocks[..., :num_blocks].unbind(2))
            num_new = self.tree.insert(tokens, values, namespace) // self.cache.block_size
            if num_new:
                self.pool.incref(blocks[..., num_blocks - num_new : num_blocks].flatten())
                self._version += 1
                self._remember(namespace, tokens, values, num_new, store=not self.write_back)
        self.cache.free(seq.kv)
        node = self._locks.pop(seq.seq_id, None)
        if node is not None:
            self.tree.unlock(node)
        seq.num_locked_tokens = 0
        self._peeks.pop(seq.seq_id, None)
        self._prefetches.pop(seq.seq_id, None)

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

    def _load_from_tiers(self, seq: Sequence, namespace: Hashable, key: list[int]) -> None:
        """Put the chunks of `key` the tree lacks and the tiers hold into the pool and the tree.

        Only into free blocks: loading never evicts. Chunks come in order and
        stop at the first one missing or failing its checks.
        """
        prefetch = self._prefetches.pop(seq.seq_id, None)
        if self.tiers is None:
            return
        if prefetch is not None:
            prefetch.result()
        bs = self.cache.block_size
        all_keys = self.tiers.chunk_keys(namespace, key)
        num_matched = self.tree.match_prefix(key, namespace).num_tokens // bs
        wanted = all_keys[num_matched : num_matched + self.pool.num_free_blocks // self.cells]
        chunks = self.tiers.fetch(wanted)
        self.tiers.unstage(all_keys)
        if not chunks:
            return
        loaded = self.tiers.install(chunks)
        num_tokens = (num_matched + len(loaded)) * bs
        prefix = self.tree.match_prefix(key[:num_tokens], namespace)
        num_new = self.tree.insert(key[:num_tokens], [*prefix.values, *loaded], namespace) // bs
        assert num_new == len(loaded), "the tree changed while chunks were loaded"
        self._remember(namespace, key[:num_tokens], loaded, num_new, store=False)
        self._version += 1
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
            self._version += 1
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
