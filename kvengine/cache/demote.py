"""Demote instead of evict: a head's important tokens stay in full precision, the rest go packed.

MiKV (Yang et al. 2024, "No Token Left Behind", arXiv:2402.18096) and
ZipCache (He et al. 2024, arXiv:2405.14256) keep every token a press would
evict, at a few bits, instead of dropping it. Here the storage is the packed
pool's own (`quant_pool.py`), with no third kind of block: after a press
ranks one layer's tokens, each head's cell is rebuilt (`PagedKVCache.retain`)
as

    [ demoted tokens: m full blocks, sealed (packed) ][ important tokens: open blocks, pinned ]

so a head's block table mixes packed and full-precision blocks, and attention
reads both through the pool as before (a demoted token is attended at its
dequantized value; it is not masked). Pinned blocks stay open until freed;
the tokens generated later fill blocks of their own, packed when full (KIVI's
residual), as in any packed cache.

Budget. `budget` is a fraction of the bytes the uncompressed cache of the
layer would hold in the pool's dtype (the 16-bit cache wherever the engine
runs in 16 bits): a head of T tokens may hold `budget * T * open_block_bytes
/ block_size` bytes, counted in whole blocks as the pool counts them
(`plan_demotion`). The most tokens stay important that the budget allows with
every other token demoted; when even demoting all of them does not fit, the
reserved tokens (sinks and recent window) stay important, as many of the best
of the rest as fit are demoted, and the others are evicted. Demoted counts
are whole blocks: a block is packed only when full.

This module plans and applies; which tokens matter is the press's business
(`press/demote.py`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from kvengine.cache.paged import PagedKVCache, SequenceKV
from kvengine.cache.pool import HOST
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.errors import InvalidRequestError


class DemotionPlan(NamedTuple):
    """How many of a head's tokens stay in full precision and how many go packed (the rest are evicted)."""

    num_important: int
    num_demoted: int  # a multiple of the block size

    def bytes_held(self, block_size: int, open_block_bytes: int, packed_block_bytes: int) -> int:
        """Bytes one head holds under this plan, in whole blocks."""
        num_open = -(-self.num_important // block_size)
        return num_open * open_block_bytes + self.num_demoted // block_size * packed_block_bytes


@functools.lru_cache(maxsize=256)
def plan_demotion(
    num_tokens: int,
    num_reserved: int,
    budget: float,
    block_size: int,
    open_block_bytes: int,
    packed_block_bytes: int,
) -> DemotionPlan:
    """The plan for one head of `num_tokens` tokens under `budget` (see the module doc).

    Of every split within the budget (at least the reserved tokens important,
    demoted tokens in whole blocks) the one that keeps the most tokens, and of
    those the one with the most in full precision. Searched exhaustively over
    (open blocks, packed blocks), once per distinct argument list (cached:
    every layer of a context asks the same). Raises InvalidRequestError when
    the budget cannot hold the `num_reserved` sinks and window tokens in full
    precision.
    """
    bs = block_size
    limit = budget * num_tokens * open_block_bytes / bs
    reserved = min(num_reserved, num_tokens)
    max_packed = (num_tokens - reserved) // bs
    best: DemotionPlan | None = None
    for num_open in range(-(-reserved // bs), -(-num_tokens // bs) + 1):
        for num_packed in range(max_packed + 1):
            important = min(num_open * bs, num_tokens - num_packed * bs)
            plan = DemotionPlan(important, num_packed * bs)
            if plan.bytes_held(bs, open_block_bytes, packed_block_bytes) > limit:
                break  # more packed blocks cost more
            if best is None or (important + plan.num_demoted, important) > (sum(best), best.num_important):
                best = plan
    if best is None:
        floor = DemotionPlan(reserved, 0).bytes_held(bs, open_block_bytes, packed_block_bytes)
        raise InvalidRequestError(
            f"demote: a budget of {budget:g} of the uncompressed cache ({int(limit)} bytes per head of "
            f"{num_tokens} tokens) is below the {floor} bytes that {reserved} sink and window tokens need "
            "in full precision; raise the budget or lower n_sink / window"
        )
    return best


def packed_pool(cache: PagedKVCache) -> QuantizedBlockPool:
    """The cache's pool, if it stores packed blocks; else InvalidRequestError (nowhere to demote to)."""
    pool = cache.pool
    if not isinstance(pool, QuantizedBlockPool):
        raise InvalidRequestError(
            "demote keeps demoted tokens packed: it needs a packed cache (kv_bits 2, 3, 4 or 8)"
        )
    return pool


def demote_layer(
    cache: PagedKVCache, seq: SequenceKV, layer: int, scores: torch.Tensor, budget: float, num_reserved: int
) -> DemotionPlan:
    """Keep each head of one layer under `budget`: best-scored tokens open, the next ones packed.

    `scores` `(H_kv, T)`: higher is more important; the reserved tokens must
    score +inf. Every head of the layer must hold the T tokens. Raises
    InvalidRequestError before changing anything when the pool does not
    pack blocks or the budget is too small.
    """
    pool = packed_pool(cache)
    num_heads, num_tokens = scores.shape
    bs = cache.block_size
    plan = plan_demotion(
        num_tokens, num_reserved, budget, bs, pool.open_bytes_per_block, pool.packed_bytes_per_block
    )
    order = scores.float().argsort(dim=1, descending=True, stable=True).to(HOST)  # (H_kv, T)
    important = order[:, : plan.num_important].sort(dim=1).values
    demoted = order[:, plan.num_important : plan.num_important + plan.num_demoted].sort(dim=1).values
    cache.retain(seq, layer, list(torch.cat([demoted, important], dim=1)))
    num_packed = plan.num_demoted // bs
    table = seq.block_table[layer]  # (H_kv, max_blocks), a view: written in place below
    num_open = -(-plan.num_important // bs)
    if num_open:
        pool.pin(table[:, num_packed : num_packed + num_open].flatten())
    if num_packed:
        table[:, :num_packed] = pool.seal(table[:, :num_packed].flatten()).view(num_heads, num_packed)
        pos = torch.arange(plan.num_demoted, device=HOST)
        seq.slots[layer, :, : plan.num_demoted] = table[:, pos // bs] * bs + pos % bs
    return plan
