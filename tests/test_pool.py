"""Block pools: allocation, ref counts, byte accounting; property-based invariants; the shared contract."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache.pool import BlockPool, KVPool, block_slots
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.errors import OutOfBlocksError


def test_allocate_release_round_trip() -> None:
    pool = BlockPool(num_blocks=8, block_size=4, head_dim=2)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert sorted(torch.cat([a, b]).tolist()) == list(range(8))
    assert pool.num_free_blocks == 0
    with pytest.raises(OutOfBlocksError, match="0 free blocks, 1 were asked"):
        pool.allocate(1)
    pool.release(a)
    assert pool.num_free_blocks == 3
    pool.check_invariants()


def test_shared_block_freed_after_last_reference() -> None:
    pool = BlockPool(num_blocks=4, block_size=4, head_dim=2)
    ids = pool.allocate(2)
    pool.incref(ids[:1])
    pool.release(ids)
    assert pool.num_free_blocks == 3  # ids[0] still referenced once
    pool.release(ids[:1])
    assert pool.num_free_blocks == 4
    with pytest.raises(ValueError, match="already free"):
        pool.release(ids[:1])
    pool.check_invariants()


def test_bytes_are_whole_blocks_of_keys_and_values() -> None:
    pool = BlockPool(num_blocks=10, block_size=16, head_dim=64, dtype=torch.float16)
    assert pool.bytes_per_block == 2 * 16 * 64 * 2
    pool.allocate(3)
    assert pool.bytes_in_use == 3 * pool.bytes_per_block
    assert BlockPool.with_capacity(pool.bytes_per_block * 7 + 5, 16, 64, torch.float16).num_blocks == 7


def test_write_then_read_returns_rows() -> None:
    pool = BlockPool(num_blocks=2, block_size=4, head_dim=3)
    slots = torch.tensor([5, 1, 6])
    k, v = torch.randn(3, 3), torch.randn(3, 3)
    pool.write(slots, k, v)
    k2, v2 = pool.read(slots)
    assert torch.equal(k, k2) and torch.equal(v, v2)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "incref", "release"]), st.integers(0, 6)), max_size=40))
def test_random_operations_keep_invariants(ops: list[tuple[str, int]]) -> None:
    pool = BlockPool(num_blocks=12, block_size=2, head_dim=1)
    held: list[int] = []  # one entry per reference we own
    for op, n in ops:
        if op == "alloc":
            if pool.can_allocate(n):
                held += pool.allocate(n).tolist()
            else:
                with pytest.raises(OutOfBlocksError):
                    pool.allocate(n)
        elif op == "incref" and held:
            block = held[n % len(held)]
            pool.incref(torch.tensor([block]))
            held.append(block)
        elif op == "release" and held:
            block = held.pop(n % len(held))
            pool.release(torch.tensor([block]))
        pool.check_invariants()
        assert pool.num_used_blocks == len(set(held))
        for block in set(held):
            assert int(pool.ref_counts[block]) == held.count(block)


# ---- the contract, for every pool ---------------------------------------------------------------

POOLS = {
    "plain": lambda: BlockPool(num_blocks=6, block_size=4, head_dim=8),
    "packed": lambda: QuantizedBlockPool(6, 6, block_size=4, head_dim=8, bits=8),
}


@pytest.mark.parametrize("kind", list(POOLS))
def test_every_pool_keeps_the_contract(kind: str) -> None:
    """Open blocks behave alike in every pool; sealing moves blocks only where `seals_blocks`."""
    pool: KVPool = POOLS[kind]()
    ids = pool.allocate(3)
    assert sorted(ids.tolist()) == [0, 1, 2] and pool.can_allocate(3) and not pool.can_allocate(4)
    with pytest.raises(OutOfBlocksError, match=r"3 free (open )?blocks, 4 were asked"):
        pool.allocate(4)
    k, v = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    pool.write_blocks(ids, k, v)
    k2, v2 = pool.read_blocks(ids.flip(0))
    assert torch.equal(k2, k.flip(0)) and torch.equal(v2, v.flip(0))
    out = (torch.empty(20, 8), torch.empty(20, 8))
    k3, v3 = pool.read(block_slots(ids, 4), out=out)
    assert k3.data_ptr() == out[0].data_ptr() and torch.equal(k3, k.reshape(12, 8))
    assert v3.data_ptr() == out[1].data_ptr() and torch.equal(v3, v.reshape(12, 8))
    assert pool.bytes_of(ids) == pool.bytes_in_use == 3 * pool.bytes_per_block == 3 * 2 * 4 * 8 * 4
    assert not bool(pool.is_sealed(ids).any())

    sealed = pool.seal(ids[:2])
    assert torch.equal(sealed, ids[:2]) != pool.seals_blocks  # a pool that does not seal keeps the ids
    assert bool(pool.is_sealed(sealed).all()) == pool.seals_blocks
    held = torch.cat([sealed, ids[2:]])
    k4, _ = pool.read_blocks(held)
    assert torch.allclose(k4, k, atol=0.05)  # exact, or within 8-bit quantization error
    assert pool.bytes_of(held) == pool.bytes_in_use and pool.num_used_blocks == 3
    pool.incref(held[:1])
    pool.release(held)
    assert pool.num_used_blocks == 1 and pool.bytes_in_use == pool.bytes_of(held[:1])
    pool.release(held[:1])
    assert pool.num_free_blocks == pool.num_blocks and pool.bytes_in_use == 0
    pool.check_invariants()


def test_the_zero_slot_reads_zeros_and_no_block_owns_it() -> None:
    pool = BlockPool(3, block_size=4, head_dim=8)
    ids = pool.allocate(3)
    slots = block_slots(ids, 4)
    pool.write(slots, torch.full((12, 8), float("nan")), torch.full((12, 8), float("inf")))
    assert pool.zero_slot not in slots.tolist()
    k, v = pool.read(torch.tensor([pool.zero_slot, 0, pool.zero_slot]))
    assert bool((k[[0, 2]] == 0).all()) and bool((v[[0, 2]] == 0).all())
    assert bool(k[1].isnan().all())


def test_the_zero_slot_of_a_packed_pool_is_not_a_sealed_slot() -> None:
    pool = QuantizedBlockPool(2, 2, block_size=4, head_dim=8, bits=4)
    ids = pool.allocate(1)
    pool.write(block_slots(ids, 4), torch.ones(4, 8), torch.ones(4, 8))
    sealed = pool.seal(ids)
    first_sealed_slot = int(sealed[0]) * 4
    k, _ = pool.read(torch.tensor([first_sealed_slot, pool.zero_slot]))
    assert torch.allclose(k[0], torch.ones(8), atol=0.1)
    assert bool((k[1] == 0).all())
