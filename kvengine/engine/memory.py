"""What an engine's memory is made of, and what it reports about it.

`make_pool` and `make_prefix_cache` build the block pool, the prefix cache
and its storage tiers from a `CacheConfig`; `memory_stats` is what they
report to metrics (the engine adds its own counters, see `Engine.stats`).
No scheduling here.
"""

from __future__ import annotations

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool, KVPool
from kvengine.cache.prefix import PrefixCache
from kvengine.cache.quant import KIVILayout
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.cache.tiered import TierBridge, make_tier_stack
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.models import LoadedModel


def make_pool(cache: CacheConfig, scheduler: SchedulerConfig, model: LoadedModel) -> KVPool:
    """The block pool a `CacheConfig` asks for, sized for `model`, on the model's device."""
    if not cache.kv_bits:
        return BlockPool.with_capacity(
            cache.max_kv_bytes, cache.block_size, model.head_dim, model.dtype, model.device
        )
    layout = KIVILayout(
        cache.block_size,
        model.head_dim,
        cache.kv_bits,
        key_groups=cache.kv_key_groups,
        rotate=cache.kv_rotate,
    )
    cells = model.num_layers * model.num_kv_heads
    # Open blocks: the largest prefill one step can write (a compressed context goes
    # in one piece) plus each running sequence's partly filled last block per cell.
    longest_step = max(scheduler.max_step_tokens, model.max_context_len)
    num_open = cells * (-(-longest_step // cache.block_size) + scheduler.max_num_seqs)
    num_packed = max(1, cache.max_kv_bytes // layout.packed_bytes)
    return QuantizedBlockPool(
        num_open,
        num_packed,
        cache.block_size,
        model.head_dim,
        cache.kv_bits,
        dtype=model.dtype,
        device=model.device,
        key_groups=cache.kv_key_groups,
        rotate=cache.kv_rotate,
    )


def make_prefix_cache(config: CacheConfig, cache: PagedKVCache, model_name: str) -> PrefixCache:
    """The prefix cache a `CacheConfig` asks for, with its storage tiers if it names any."""
    stack = make_tier_stack(config)
    bridge = None
    if stack is not None:
        assert not cache.pool.seals_blocks  # CacheConfig refuses tiers with KIVI
        bridge = TierBridge(
            stack, cache.pool, model_name, cache.num_layers, cache.num_kv_heads, secret=config.tier_secret()
        )
    return PrefixCache(cache, model_name, config.eviction_policy, bridge, config.tier_write == "back")


# What a prefix cache would report, when there is none: nothing cached, hit or evicted.
_NO_PREFIX_CACHE: dict[str, float] = {
    "pool_blocks_cached": 0,
    "prefix_hit_tokens_total": 0,
    "prefix_evicted_blocks_total": 0,
}


def memory_stats(pool: KVPool, prefix: PrefixCache | None) -> dict[str, float]:
    """What the pool and the prefix cache report (their `stats()`), merged, for metrics.

    Keys ending in `_total` only grow (counters); the others are gauges.
    """
    return {**pool.stats(), **(prefix.stats() if prefix is not None else _NO_PREFIX_CACHE)}
