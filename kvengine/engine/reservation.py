"""Block counts behind admission: what a sequence may hold at most, reserves, or takes at once.

Pure functions of a sequence and the cache's geometry: no pool state, no
decisions. The scheduler (scheduler.py) admits, plans and preempts with them.
Counts are pool blocks, summed over every (layer, kv-head) cell.
"""

from __future__ import annotations

from kvengine.cache.paged import PagedKVCache
from kvengine.engine.request import Sequence

GROWTH_BLOCKS = 4  # blocks per cell a plain sequence reserves beyond what it holds


def worst_case_blocks(cache: PagedKVCache, seq: Sequence, max_context_len: int) -> int:
    """Blocks `seq` can hold at most if it generates all of `max_tokens`."""
    generated = 0 if seq.is_context else seq.params.max_tokens
    if seq.parent is not None:
        # A fork copies each cell's partly filled last block and grows from there.
        cells = cache.num_layers * cache.num_kv_heads
        new_tokens = len(seq.prompt_ids) - seq.parent.num_computed + generated
        return cells + cache.blocks_for_tokens(new_tokens)
    tokens = min(len(seq.prompt_ids) + generated, max_context_len)
    if seq.decode_press is not None:
        # Never more than the prompt or the budget plus a block, and while a layer
        # is cut back its kept tokens are copied before the old blocks go.
        bs = cache.block_size
        tokens = min(tokens, max(len(seq.prompt_ids), seq.decode_budget + bs) + 1)
        copy = cache.num_kv_heads * -(-seq.decode_budget // bs)
        return cache.blocks_for_tokens(tokens) + copy
    return cache.blocks_for_tokens(tokens)


def growth_blocks(cache: PagedKVCache, seq: Sequence, max_context_len: int, num_locked_tokens: int) -> int:
    """Blocks a running plain sequence reserves: what it holds and `GROWTH_BLOCKS` more per cell.

    Less the blocks of the `num_locked_tokens` cached prefix it reuses (counted once, for all).
    """
    remaining = seq.params.max_tokens - len(seq.output_ids)
    growth = min(remaining, GROWTH_BLOCKS * cache.block_size)
    tokens = min(seq.num_tokens + growth, max_context_len)
    return cache.blocks_for_tokens(tokens) - cache.blocks_for_tokens(num_locked_tokens)


def compressed_blocks(cache: PagedKVCache, seq: Sequence) -> int:
    """Blocks a sequence whose context was just compressed holds, plus its worst-case growth."""
    assert seq.kv is not None
    growth = 0 if seq.is_context else seq.num_tokens - seq.num_computed + seq.params.max_tokens
    return int(seq.kv.num_blocks.sum()) + cache.blocks_needed(seq.kv, growth)


def press_blocks(cache: PagedKVCache, seq: Sequence, num_tokens: int) -> int:
    """Blocks a press needs free while it runs after a step of `num_tokens` (0 if none runs).

    It copies one layer's kept tokens into new blocks before the old ones go
    (see `PagedKVCache.retain`).
    """
    if not (seq.awaits_compression and seq.num_computed + num_tokens == seq.context_len):
        return 0
    return cache.num_kv_heads * -(-seq.context_len // cache.block_size)


def fork_blocks(cache: PagedKVCache, seq: Sequence) -> int:
    """Blocks a fork of `seq`'s context takes at once: a copy of each partly filled last block."""
    assert seq.parent is not None and seq.parent.kv is not None
    kv = seq.parent.kv
    return int(((kv.lens % cache.block_size != 0) & (kv.num_blocks > 0)).sum())
