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


def test_positions_follow_each_token_through_append_retain_fork_and_share() -> None:
    """Reference: the positions each cell's tokens were appended at, indexed by what it keeps."""
    cache = make_cache()
    seq = cache.new_sequence()
    cache.append(seq, 6, start_pos=0)
    cache.append(seq, 4)  # continues at the next position
    assert seq.next_pos == 10 and seq.token_positions(0).tolist() == [list(range(10))] * HEADS
    keep = [torch.tensor([0, 4, 9]), torch.tensor([1, 2, 3, 5, 6, 7, 8])]
    cache.retain(seq, 1, keep)
    cache.append(seq, 2, start_pos=10)
    for head, idx in enumerate(keep):
        assert seq.positions[1, head, : int(seq.lens[1, head])].tolist() == [*idx.tolist(), 10, 11]
    child = cache.fork(seq)
    cache.append(child, 1, start_pos=20)  # a gap: the child continues elsewhere
    assert child.positions[1, 0, :6].tolist() == [0, 4, 9, 10, 11, 20] and child.next_pos == 21
    assert seq.positions[1, 0, :5].tolist() == [0, 4, 9, 10, 11] and seq.next_pos == 12
    with pytest.raises(ValueError, match="before"):
        cache.append(seq, 1, start_pos=11)
    assert cache.full_blocks(child).shape[-1] == 0  # layer 1's first block is no longer positions 0..3
    plain = cache.new_sequence()
    cache.append(plain, BLOCK + 1)
    shared = cache.share_blocks(cache.full_blocks(plain))
    assert shared.next_pos == BLOCK and shared.token_positions(2).tolist() == [list(range(BLOCK))] * HEADS
    for s in (seq, child, plain, shared):
        cache.free(s)
    cache.pool.check_invariants()
    assert cache.pool.num_used_blocks == 0


def test_full_blocks_stop_where_a_press_changed_the_order() -> None:
    cache = make_cache()
    seq = cache.new_sequence()
    cache.append(seq, 3 * BLOCK)
    assert cache.full_blocks(seq).shape[-1] == 3
    cache.retain(seq, 0, [torch.cat([torch.arange(BLOCK), torch.arange(BLOCK + 1, 3 * BLOCK)])] * HEADS)
    assert cache.full_blocks(seq).shape[-1] == 1  # block 1 of layer 0 now starts at position 5
    cache.free(seq)


def test_release_outside_window_frees_only_blocks_no_later_query_sees() -> None:
    """Window 9 after 30 tokens: the next query (position 30) sees positions 22..30, so blocks
    holding only positions <= 21 go (five of eight in every head); the rest read back unchanged."""
    window, n = 9, 30
    cache = make_cache()
    seq = cache.new_sequence()
    slots = cache.append(seq, n)
    k = torch.randn(LAYERS, HEADS, n, HEAD_DIM)
    cache.pool.write(slots.reshape(-1), k.reshape(-1, HEAD_DIM), -k.reshape(-1, HEAD_DIM))
    used = cache.pool.num_used_blocks
    assert cache.release_outside_window(seq, 1, window) == 5 * HEADS
    assert cache.pool.num_used_blocks == used - 5 * HEADS
    assert cache.bytes_held(seq) == cache.pool.bytes_in_use
    assert seq.lens[1].tolist() == [n - 5 * BLOCK] * HEADS and seq.num_blocks[1].tolist() == [3] * HEADS
    assert seq.token_positions(1).tolist() == [list(range(5 * BLOCK, n))] * HEADS
    ctx_slots, _ = seq.context(1)
    kk, vv = cache.pool.read(ctx_slots.reshape(-1))
    assert torch.equal(kk.view(HEADS, -1, HEAD_DIM), k[1, :, 5 * BLOCK :]) and torch.equal(vv, -kk)
    assert cache.release_outside_window(seq, 1, window) == 0  # nothing more until the sequence moves
    assert cache.full_blocks(seq).shape[-1] == 0  # layer 1 no longer starts at position 0
    cache.append(seq, 2)  # appends continue in every cell; layer 1 fills its last block
    assert seq.num_blocks[1].tolist() == [3] * HEADS and seq.token_positions(1)[0, -1] == n + 1
    cache.free(seq)
    cache.pool.check_invariants()
    assert cache.pool.num_used_blocks == 0


def test_release_outside_window_keeps_heads_of_a_layer_equally_long() -> None:
    """After a press kept other tokens per head, only blocks unseen in every head go."""
    cache = make_cache()
    seq = cache.new_sequence()
    cache.append(seq, 24)
    # Head 0 keeps positions 0..11 (old), head 1 keeps 12..23 (recent): 3 blocks each. Window 13:
    # the next query (24) sees positions >= 12, so head 0 could lose every block, head 1 none.
    cache.retain(seq, 0, [torch.arange(12), torch.arange(12, 24)])
    assert cache.release_outside_window(seq, 0, 13) == 0
    cache.append(seq, 30)  # next query at 54 sees positions >= 42: 7 leading blocks unseen in each head
    assert cache.release_outside_window(seq, 0, 13) == 7 * HEADS
    assert (
        seq.lens[0].tolist() == [14, 14] and seq.token_positions(0).tolist() == [list(range(40, 54))] * HEADS
    )
    cache.free(seq)
    cache.pool.check_invariants()
