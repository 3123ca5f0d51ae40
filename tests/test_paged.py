"""Block tables per (layer, kv-head): slots, byte accounting, retain, free."""

from __future__ import annotations

import math

import pytest
import torch

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool, KVPool
from kvengine.cache.quant_pool import QuantizedBlockPool

LAYERS, HEADS, HEAD_DIM, BLOCK = 3, 2, 4, 4


def make_cache(num_blocks: int = 256) -> PagedKVCache:
    return PagedKVCache(BlockPool(num_blocks, BLOCK, HEAD_DIM), LAYERS, HEADS)


@pytest.mark.parametrize("chunks", [[1], [5], [4, 4], [3, 1, 1, 7, 2], [16]])
def test_bytes_held_match_formula_and_slots_are_disjoint(chunks: list[int]) -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    for n in chunks:
        cache.append(seq, n)
    tokens = sum(chunks)
    dtype_bytes = 4
    expected = 2 * LAYERS * HEADS * HEAD_DIM * dtype_bytes * math.ceil(tokens / BLOCK) * BLOCK
    assert cache.bytes_held(seq) == expected == cache.pool.bytes_in_use
    all_slots = seq.slots[:, :, :tokens].flatten()
    assert all_slots.unique().numel() == all_slots.numel()
    # Every slot lies in a block its own (layer, head) cell owns.
    for layer in range(LAYERS):
        for head in range(HEADS):
            owned = set(seq.block_table[layer, head, : int(seq.num_blocks[layer, head])].tolist())
            assert {s // BLOCK for s in seq.slots[layer, head, :tokens].tolist()} == owned
    cache.free(seq)
    assert cache.pool.num_free_blocks == cache.pool.num_blocks
    cache.pool.check_invariants()


def test_appended_slots_store_values_in_cache_order() -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    written = []
    for n in [3, 1, 6]:
        slots = cache.append(seq, n)  # (L, H, n)
        k = torch.randn(LAYERS, HEADS, n, HEAD_DIM)
        cache.pool.write(slots.reshape(-1), k.reshape(-1, HEAD_DIM), k.reshape(-1, HEAD_DIM))
        written.append(k)
    expected = torch.cat(written, dim=2)
    for layer in range(LAYERS):
        ctx_slots, lens = seq.context(layer)
        assert lens is None
        k, _ = cache.pool.read(ctx_slots.reshape(-1))
        assert torch.equal(k.view(HEADS, 10, HEAD_DIM), expected[layer])


def test_retain_frees_memory_per_head_and_keeps_values() -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    slots = cache.append(seq, 10)
    k = torch.randn(LAYERS, HEADS, 10, HEAD_DIM)
    cache.pool.write(slots.reshape(-1), k.reshape(-1, HEAD_DIM), -k.reshape(-1, HEAD_DIM))
    before = cache.pool.num_used_blocks
    keep = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 5, 6, 7, 8])]
    cache.retain(seq, 1, keep)
    # Layer 1: head 0 holds 3 tokens (1 block), head 1 holds 7 (2 blocks); it held 3 + 3.
    assert cache.pool.num_used_blocks == before - 6 + 3
    ctx_slots, lens = seq.context(1)
    assert lens is not None and lens.tolist() == [3, 7]
    for head, idx in enumerate(keep):
        kk, vv = cache.pool.read(ctx_slots[head, : idx.numel()])
        assert torch.equal(kk, k[1, head, idx]) and torch.equal(vv, -k[1, head, idx])
    # Appending after retain continues each head at its own length.
    cache.append(seq, 2)
    assert seq.lens[1].tolist() == [5, 9] and seq.lens[0].tolist() == [12, 12]
    cache.free(seq)
    cache.pool.check_invariants()
    assert cache.pool.num_used_blocks == 0


def test_retain_rejects_bad_indices() -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    cache.append(seq, 4)
    with pytest.raises(IndexError):
        cache.retain(seq, 0, [torch.tensor([4]), torch.tensor([0])])
    with pytest.raises(ValueError, match="heads"):
        cache.retain(seq, 0, [torch.tensor([0])])


def test_blocks_needed_predicts_append() -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    for n in [1, 3, 1, 9]:
        need = cache.blocks_needed(seq, n)
        free = cache.pool.num_free_blocks
        cache.append(seq, n)
        assert free - cache.pool.num_free_blocks == need
    assert cache.blocks_for_tokens(14) == LAYERS * HEADS * 4


def test_fork_shares_full_blocks_and_copies_partial_ones() -> None:
    cache = make_cache()
    parent = cache.new_sequence()
    slots = cache.append(parent, 6)  # one full block and one block of 2 per cell
    k = torch.randn(LAYERS, HEADS, 6, HEAD_DIM)
    cache.pool.write(slots.reshape(-1), k.reshape(-1, HEAD_DIM), k.reshape(-1, HEAD_DIM))
    cache.retain(parent, 2, [torch.tensor([0, 1, 2, 3]), torch.tensor([1, 5])])  # layer 2: 4 and 2 tokens
    used = cache.pool.num_used_blocks
    child = cache.fork(parent)
    partial_cells = int((parent.lens % BLOCK != 0).sum())
    assert cache.pool.num_used_blocks == used + partial_cells
    # Appends to one do not show in the other.
    new = cache.append(child, 3)
    cache.pool.write(new.reshape(-1), torch.ones(new.numel(), HEAD_DIM), torch.ones(new.numel(), HEAD_DIM))
    for layer in range(LAYERS):
        p_slots, _ = parent.context(layer)
        c_slots, _ = child.context(layer)
        for head in range(HEADS):
            n = int(parent.lens[layer, head])
            pk, _ = cache.pool.read(p_slots[head, :n])
            ck, _ = cache.pool.read(c_slots[head, :n])
            assert torch.equal(pk, ck)  # same cached tokens
    cache.free(parent)
    cache.pool.check_invariants()
    assert cache.pool.num_used_blocks == cache.bytes_held(child) // cache.pool.bytes_per_block
    cache.free(child)
    assert cache.pool.num_used_blocks == 0


@pytest.mark.parametrize("packed", [False, True])
def test_sealing_full_blocks_keeps_every_token_readable(packed: bool) -> None:
    """Full blocks of a packed pool are sealed in place of the open ones; a plain pool seals nothing."""
    pool: KVPool = QuantizedBlockPool(64, 64, BLOCK, 8, bits=8) if packed else BlockPool(64, BLOCK, 8)
    cache = PagedKVCache(pool, LAYERS, HEADS)
    seq = cache.new_sequence()
    slots = cache.append(seq, 2 * BLOCK + 1)  # (L, H, 9): two full blocks and one token per cell
    k = torch.randn(LAYERS, HEADS, 2 * BLOCK + 1, 8)
    pool.write(slots.reshape(-1), k.reshape(-1, 8), -k.reshape(-1, 8))
    cells = LAYERS * HEADS
    assert cache.seal_full_blocks(seq) == (2 * cells if packed else 0)
    assert pool.num_used_blocks == 3 * cells and cache.bytes_held(seq) == pool.bytes_in_use
    assert bool(pool.is_sealed(seq.block_table[..., :2]).all()) == packed
    assert not bool(pool.is_sealed(seq.block_table[..., 2]).any())  # the residual stays open
    for layer in range(LAYERS):
        ctx_slots, lens = seq.context(layer)
        k_read, v_read = pool.read(ctx_slots.reshape(-1))
        assert lens is None and torch.allclose(k_read.view(HEADS, -1, 8), k[layer], atol=0.05)
        assert torch.allclose(v_read.view(HEADS, -1, 8), -k[layer], atol=0.05)
        assert torch.equal(k_read[-1], k[layer, -1, -1])  # the open residual is exact
    cache.free(seq)
    assert pool.bytes_in_use == 0
    pool.check_invariants()
