"""Packed KIVI storage: bit packing, the quantization rule vs a naive float reference,
sealing and reading mixed blocks, immutability of sealed blocks, ref counts, bytes.

Error bound checked per element (see `kvengine/cache/quant.py`): with s, z the
exact min-max scale and zero point of an element's group and s16, z16 their
float16 roundings (as stored),

    |x - x_hat| <= s / 2 + (2**bits - 1) * |s - s16| + |z - z16|  (+ 1e-5 * max|x| float32 slack).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.quant import KIVILayout, pack_bits, unpack_bits
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.errors import InvalidRequestError, OutOfBlocksError

BITS = (2, 4, 8)


# ---- naive references ------------------------------------------------------


def naive_pack(codes: list[int], bits: int) -> list[int]:
    """Bytes of `codes`, code i of a byte at bit offset i * bits, written with plain ints."""
    per_byte = 8 // bits
    out = []
    for start in range(0, len(codes), per_byte):
        byte = 0
        for i, c in enumerate(codes[start : start + per_byte]):
            byte |= c << (i * bits)
        out.append(byte)
    return out


def naive_bound(group: torch.Tensor, bits: int) -> float:
    """The stated error bound for one quantization group (any shape), computed in float64."""
    lo, hi = float(group.double().min()), float(group.double().max())
    s = (hi - lo) / (2**bits - 1)
    s16 = float(torch.tensor(s).half())
    z16 = float(torch.tensor(lo).half())
    return s / 2 + (2**bits - 1) * abs(s - s16) + abs(lo - z16) + 1e-5 * max(abs(lo), abs(hi))


def check_keys_per_channel(x: torch.Tensor, x_hat: torch.Tensor, bits: int) -> None:
    """x, x_hat `(block_size, D)`: each channel (column) is one group."""
    for c in range(x.shape[1]):
        err = float((x[:, c].double() - x_hat[:, c].double()).abs().max())
        assert err <= naive_bound(x[:, c], bits), f"key channel {c}: error {err}"


def check_values_per_token(x: torch.Tensor, x_hat: torch.Tensor, bits: int, group: int) -> None:
    """x, x_hat `(block_size, D)`: each token's run of `group` channels is one group."""
    for t in range(x.shape[0]):
        for g in range(0, x.shape[1], group):
            ref, got = x[t, g : g + group].double(), x_hat[t, g : g + group].double()
            err = float((ref - got).abs().max())
            assert err <= naive_bound(x[t, g : g + group], bits), f"value token {t}, channels {g}+: {err}"


def kivi_like(block_size: int, head_dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys with outlier channels (large per-channel offsets and scales), values with
    per-token scales: grouping the wrong way round would break the per-group bound."""
    g = torch.Generator().manual_seed(seed)
    chan = torch.linspace(0.1, 8.0, head_dim)
    k = torch.randn(block_size, head_dim, generator=g) * chan + 5 * chan.flip(0)  # (T, D)
    tok = torch.logspace(-2, 1, block_size)[:, None]
    v = torch.randn(block_size, head_dim, generator=g) * tok  # (T, D)
    return k, v


def block_slots(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    return (ids[:, None] * block_size + torch.arange(block_size)).flatten()


# ---- packing and the quantization rule ---------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 64, 203])
def test_pack_unpack_round_trip_matches_naive_layout(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, -(-n * bits // 8))
    for row in range(3):
        assert packed[row].tolist() == naive_pack(codes[row].tolist(), bits)
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits", BITS)
def test_quantize_blocks_within_bound_keys_per_channel_values_per_token(bits: int) -> None:
    layout = KIVILayout(block_size=16, head_dim=32, bits=bits, value_group_size=8)
    k, v = kivi_like(16, 32, seed=bits)
    packed = layout.quantize_blocks(k[None], v[None])
    # Scales and zeros are the min-max rule per group, rounded to float16.
    assert torch.equal(packed.k_zero[0], k.amin(0).half())
    torch.testing.assert_close(packed.k_scale[0], ((k.amax(0) - k.amin(0)) / (2**bits - 1)).half())
    v_groups = v.view(16, 4, 8)
    assert torch.equal(packed.v_zero[0], v_groups.amin(-1).half())
    k_hat, v_hat = layout.dequantize_blocks(packed, torch.float32)
    check_keys_per_channel(k, k_hat[0], bits)
    check_values_per_token(v, v_hat[0], bits, group=8)


def test_constant_group_is_exact_up_to_float16() -> None:
    layout = KIVILayout(block_size=4, head_dim=8, bits=2)
    k = torch.full((1, 4, 8), 0.5)
    k_hat, v_hat = layout.dequantize_blocks(layout.quantize_blocks(k, k), torch.float32)
    assert torch.equal(k_hat, k) and torch.equal(v_hat, k)


# ---- the pool ------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
def test_seal_then_read_mixed_open_and_sealed_slots(bits: int) -> None:
    bs, d = 8, 16
    pool = QuantizedBlockPool(4, 4, bs, d, bits=bits, value_group_size=8)
    ids = pool.allocate(3)
    data = [kivi_like(bs, d, seed=i) for i in range(3)]
    for i, (k, v) in enumerate(data):
        pool.write(block_slots(ids[i : i + 1], bs), k, v)
    sealed = pool.seal(ids[:2])
    assert bool(pool.is_sealed(sealed).all()) and pool.num_used_open_blocks == 1
    blocks = torch.cat([sealed, ids[2:]])  # data[i] now lives in blocks[i]
    slots = block_slots(blocks, bs)
    order = torch.randperm(slots.numel(), generator=torch.Generator().manual_seed(0))
    out = (torch.empty(40, d), torch.empty(40, d))
    k_read, v_read = pool.read(slots[order])
    k_out, v_out = pool.read(slots[order], out=out)
    assert torch.equal(k_out, k_read) and torch.equal(v_out, v_read)
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel())
    k_read, v_read = k_read[back].view(3, bs, d), v_read[back].view(3, bs, d)
    for i in range(2):
        check_keys_per_channel(data[i][0], k_read[i], bits)
        check_values_per_token(data[i][1], v_read[i], bits, group=8)
    assert torch.equal(k_read[2], data[2][0]) and torch.equal(v_read[2], data[2][1])
    pool.check_invariants()


def test_appending_never_changes_sealed_blocks() -> None:
    bs, d = 8, 16
    pool = QuantizedBlockPool(2, 6, bs, d, bits=2)
    first = pool.allocate(1)
    pool.write(block_slots(first, bs), *kivi_like(bs, d, seed=0))
    sealed = pool.seal(first)
    row = int(sealed) - pool.num_open_blocks
    # Bit for bit: float16 fields compared as int16 so -0.0 vs 0.0 or NaNs cannot hide a change.
    snapshot = [t[row].clone().view(torch.uint8) for t in pool.packed]
    read_before = pool.read(block_slots(sealed, bs))
    for step in range(1, 5):
        fresh = pool.allocate(1)
        k, v = kivi_like(bs, d, seed=step)
        pool.write(block_slots(fresh, bs), 100.0 * k, v - 50.0)  # very different ranges
        pool.seal(fresh)
        assert all(
            torch.equal(t[row].view(torch.uint8), s) for t, s in zip(pool.packed, snapshot, strict=True)
        )
        read_after = pool.read(block_slots(sealed, bs))
        assert torch.equal(read_after[0], read_before[0]) and torch.equal(read_after[1], read_before[1])
    pool.check_invariants()


def test_works_under_paged_kv_cache() -> None:
    """PagedKVCache allocates open blocks and reads them back through the pool unchanged."""
    pool = QuantizedBlockPool(8, 8, block_size=4, head_dim=8, bits=4)
    cache = PagedKVCache(pool, num_layers=2, num_kv_heads=2)
    seq = cache.new_sequence()
    slots = cache.append(seq, 6)  # (L, H, 6)
    k, v = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    pool.write(slots.reshape(-1), k.reshape(-1, 8), v.reshape(-1, 8))
    ctx_slots, lens = seq.context(1)
    k1, v1 = pool.read(ctx_slots.reshape(-1))
    assert lens is None and torch.equal(k1.view(2, 6, 8), k[1]) and torch.equal(v1.view(2, 6, 8), v[1])
    cache.free(seq)
    assert pool.bytes_in_use == 0
    pool.check_invariants()


def test_refcounts_for_open_and_sealed_blocks() -> None:
    pool = QuantizedBlockPool(3, 2, block_size=2, head_dim=4, bits=8)
    a = pool.allocate(2)
    pool.write(block_slots(a, 2), torch.randn(4, 4), torch.randn(4, 4))
    pool.incref(a[:1])
    with pytest.raises(ValueError, match="exactly one reference"):
        pool.seal(a[:1])  # shared: other holders would keep a freed id
    pool.release(a[:1])
    packed = pool.seal(a)
    assert sorted(packed.tolist()) == [3, 4] and pool.num_free_open_blocks == 3
    pool.incref(packed[:1])
    pool.release(packed)
    assert pool.num_free_packed_blocks == 1  # packed[0] still referenced once
    pool.release(packed[:1])
    assert pool.num_free_packed_blocks == 2 and pool.bytes_in_use == 0
    with pytest.raises(ValueError, match="already free"):
        pool.release(packed[:1])
    with pytest.raises(ValueError, match="exactly one reference"):
        pool.seal(a[:1])  # free
    pool.check_invariants()


def test_seal_out_of_packed_blocks_changes_nothing() -> None:
    pool = QuantizedBlockPool(3, 1, block_size=2, head_dim=4)
    ids = pool.allocate(2)
    with pytest.raises(OutOfBlocksError, match="1 free packed blocks, 2 were asked"):
        pool.seal(ids)
    assert pool.num_used_open_blocks == 2 and pool.num_used_packed_blocks == 0
    pool.check_invariants()


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["alloc", "incref", "release", "seal"]), st.integers(0, 5)), max_size=40
    )
)
def test_random_operations_keep_invariants(ops: list[tuple[str, int]]) -> None:
    pool = QuantizedBlockPool(6, 6, block_size=2, head_dim=4, bits=2)
    held: list[int] = []  # one entry per reference we hold
    for op, n in ops:
        if op == "alloc" and pool.can_allocate(n):
            held += pool.allocate(n).tolist()
        elif op == "incref" and held:
            pool.incref(torch.tensor([held[n % len(held)]]))
            held.append(held[n % len(held)])
        elif op == "release" and held:
            pool.release(torch.tensor([held.pop(n % len(held))]))
        elif op == "seal" and held:
            block = held[n % len(held)]
            if block < pool.num_open_blocks and held.count(block) == 1 and pool.can_seal(1):
                pool.write(block_slots(torch.tensor([block]), 2), torch.randn(2, 4), torch.randn(2, 4))
                held[held.index(block)] = int(pool.seal(torch.tensor([block])))
        pool.check_invariants()
        for block in set(held):
            assert int(pool.ref_counts[block]) == held.count(block)
        assert pool.num_used_blocks == len(set(held))
        assert pool.bytes_in_use == pool.bytes_of(torch.tensor(sorted(set(held)), dtype=torch.int64))


# ---- bytes ------------------------------------------------------------------------


def test_byte_accounting_matches_the_tensors_held() -> None:
    pool = QuantizedBlockPool(5, 7, block_size=16, head_dim=64, bits=2, dtype=torch.float16)
    assert pool.packed_bytes_per_block == sum(t[0].nbytes for t in pool.packed)
    assert pool.open_bytes_per_block == 2 * 16 * 64 * 2
    zero_rows = 2 * 64 * 2  # the zero slot's key and value row, not a block
    assert pool.capacity_bytes == pool.k.nbytes + pool.v.nbytes - zero_rows + sum(
        t.nbytes for t in pool.packed
    )
    # 2-bit codes of 16 x 64 keys and values, float16 scale+zero per key channel and per value token+group
    assert pool.packed_bytes_per_block == 2 * (16 * 64 // 4) + 2 * 64 * 2 + 2 * 16 * 2 * 2


@pytest.mark.parametrize(("bits", "max_ratio"), [(2, 0.22), (4, 0.35), (8, 0.6)])
def test_4096_token_cache_ratio_vs_16_bit(bits: int, max_ratio: float) -> None:
    """30 layers x 3 kv-heads x head_dim 64 (SmolLM2-135M), blocks of 32, one open block per cell."""
    num_layers, num_heads, head_dim, bs, num_tokens = 30, 3, 64, 32, 4096
    cells, blocks_per_cell = num_layers * num_heads, num_tokens // bs
    pool = QuantizedBlockPool(
        cells, cells * (blocks_per_cell - 1), bs, head_dim, bits=bits, dtype=torch.float16
    )
    g = torch.Generator().manual_seed(bits)
    k = torch.randn(cells * bs, head_dim, generator=g).half()
    v = torch.randn(cells * bs, head_dim, generator=g).half()
    for j in range(blocks_per_cell):  # one block of every cell at a time, all but the last sealed
        ids = pool.allocate(cells)
        pool.write(block_slots(ids, bs), k, v)
        if j < blocks_per_cell - 1:
            pool.seal(ids)
    assert pool.num_used_open_blocks == cells and pool.num_free_packed_blocks == 0
    held = cells * ((blocks_per_cell - 1) * sum(t[0].nbytes for t in pool.packed) + 2 * bs * head_dim * 2)
    assert pool.bytes_in_use == held
    dense = 2 * num_layers * num_heads * head_dim * 2 * num_tokens
    assert pool.bytes_in_use <= max_ratio * dense, pool.bytes_in_use / dense


# ---- bad input ---------------------------------------------------------------------


def test_bad_input_raises_clear_errors() -> None:
    with pytest.raises(InvalidRequestError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        QuantizedBlockPool(2, 2, block_size=4, head_dim=8, bits=5)
    with pytest.raises(InvalidRequestError, match="bits must be one of"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), 1)
    with pytest.raises(
        InvalidRequestError, match=r"head_dim \(48\) must be a multiple of value_group_size \(32\)"
    ):
        QuantizedBlockPool(2, 2, block_size=4, head_dim=48, bits=2)
    assert KIVILayout(block_size=4, head_dim=16).value_group_size == 16  # default: min(32, head_dim)
    with pytest.raises(InvalidRequestError, match="floating point"):
        QuantizedBlockPool(2, 2, block_size=4, head_dim=8, dtype=torch.int8)
    pool = QuantizedBlockPool(2, 2, block_size=4, head_dim=8)
    ids = pool.allocate(1)
    pool.write(block_slots(ids, 4), torch.randn(4, 8), torch.randn(4, 8))
    sealed = pool.seal(ids)
    with pytest.raises(ValueError, match=f"write into sealed block {int(sealed)}"):
        pool.write(block_slots(sealed, 4)[:1], torch.randn(1, 8), torch.randn(1, 8))
    with pytest.raises(ValueError, match="never re-quantized"):
        pool.seal(sealed)
