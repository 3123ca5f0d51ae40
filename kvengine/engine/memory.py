"""What an engine's memory is made of, and what it reports about it.

`make_pool` and `make_prefix_cache` build the block pool, the prefix cache
and its storage tiers from a `CacheConfig`; `engine_stats` is the snapshot
of gauges and counters that metrics export. No scheduling here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvengine.cache.paged import KVPool, PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.cache.quant import KIVILayout
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.prefix import PrefixCache
from kvengine.engine.tiered import TierBridge, make_tier_stack
from kvengine.models import LoadedModel

if TYPE_CHECKING:
    from kvengine.engine.engine import Engine


def make_pool(cache: CacheConfig, scheduler: SchedulerConfig, model: LoadedModel) -> KVPool:
    """The block pool a `CacheConfig` asks for, sized for `model`."""
    if not cache.kv_bits:
        return BlockPool.with_capacity(cache.max_kv_bytes, cache.block_size, model.head_dim, model.dtype)
    layout = KIVILayout(cache.block_size, model.head_dim, cache.kv_bits)
    cells = model.num_layers * model.num_kv_heads
    # Open blocks: the largest prefill one step can write (a compressed context goes
    # in one piece) plus each running sequence's partly filled last block per cell.
    longest_step = max(scheduler.max_step_tokens, model.max_context_len)
    num_open = cells * (-(-longest_step // cache.block_size) + scheduler.max_num_seqs)
    num_packed = max(1, cache.max_kv_bytes // layout.packed_bytes)
    return QuantizedBlockPool(
        num_open, num_packed, cache.block_size, model.head_dim, cache.kv_bits, dtype=model.dtype
    )


def make_prefix_cache(config: CacheConfig, cache: PagedKVCache, model_name: str) -> PrefixCache:
    """The prefix cache a `CacheConfig` asks for, with its storage tiers if it names any."""
    stack = make_tier_stack(config)
    bridge = None
    if stack is not None:
        assert isinstance(cache.pool, BlockPool)  # CacheConfig refuses tiers with KIVI
        bridge = TierBridge(stack, cache.pool, model_name, cache.num_layers, cache.num_kv_heads)
    return PrefixCache(cache, model_name, config.eviction_policy, bridge, config.tier_write == "back")


def engine_stats(engine: Engine) -> dict[str, float]:
    """A snapshot of the engine's gauges and counters, for metrics.

    Keys ending in `_total` only grow (counters); the others are gauges.
    """
    pool, prefix = engine.pool, engine.prefix
    stats: dict[str, float] = {
        "requests_running": len(engine.scheduler.running),
        "requests_waiting": len(engine.scheduler.waiting),
        "pool_blocks": pool.num_blocks,
        "pool_blocks_used": pool.num_used_blocks,
        "pool_blocks_free": pool.num_free_blocks,
        "pool_blocks_cached": prefix.num_evictable_blocks if prefix is not None else 0,
        "pool_bytes_used": pool.bytes_in_use,
        "pool_bytes_capacity": pool.capacity_bytes,
        "prompt_tokens_total": engine.num_prompt_tokens,
        "prefix_hit_tokens_total": prefix.num_hit_tokens if prefix is not None else 0,
        "prefix_evicted_blocks_total": prefix.num_evicted_blocks if prefix is not None else 0,
        "compression_bytes_saved_total": engine.num_compressed_bytes_saved,
        "decode_compressions_total": engine.num_decode_compressions,
        "preemptions_total": engine.num_preemptions,
        "prefill_tokens_total": engine.num_prefill_tokens,
        "compressions_total": engine.num_compressions,
    }
    if prefix is not None:
        stats["prefix_tier_hit_tokens_total"] = prefix.num_tier_hit_tokens
        stats["compressed_prefix_entries"] = len(prefix.compressed.entries)
        stats["compressed_prefix_hits_total"] = prefix.compressed.num_hits
        stats["compressed_prefix_stores_total"] = prefix.compressed.num_stores
        stats["compressed_prefix_evictions_total"] = prefix.compressed.num_evictions
        if prefix.tiers is not None:
            stats.update(prefix.tiers.stats())
    return stats
