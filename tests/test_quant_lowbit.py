"""3-bit packing, per-token key groups, pinned blocks, and the config and CLI options of packed caches.

The error bound per element is the one `test_quant.py` states, for every group layout.
"""

from __future__ import annotations

import argparse

import pytest
import torch
from test_quant import block_slots, check_keys_per_channel, check_values_per_token, kivi_like

from kvengine.cache.quant import KIVILayout, pack_bits, packed_len, unpack_bits
from kvengine.cache.quant_pool import QuantizedBlockPool
from kvengine.cli.common import add_config_args, config_from_args
from kvengine.config import CacheConfig
from kvengine.errors import InvalidRequestError

BITS = (2, 3, 4, 8)


def naive_stream(codes: list[int], bits: int, num_bytes: int) -> list[int]:
    """The codes as one little-endian bit stream (code i at bit i * bits), cut into bytes."""
    value = 0
    for i, c in enumerate(codes):
        value |= c << (i * bits)
    return list(value.to_bytes(num_bytes, "little"))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 203])
def test_pack_is_the_little_endian_bit_stream(bits: int, n: int) -> None:
    codes = torch.randint(0, 2**bits, (3, n), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_bits(codes, bits)
    # Whole words: 1 byte at 2, 4 and 8 bits; 3 bytes (8 codes) at 3 bits.
    word_bytes, per_word = (3, 8) if bits == 3 else (1, 8 // bits)
    assert packed.shape == (3, packed_len(n, bits)) == (3, -(-n // per_word) * word_bytes)
    for row in range(3):
        assert packed[row].tolist() == naive_stream(codes[row].tolist(), bits, packed.shape[1])
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("key_groups", ["channel", "token"])
@pytest.mark.parametrize("bits", BITS)
def test_packed_bytes_is_what_the_tensors_hold(bits: int, key_groups: str) -> None:
    layout = KIVILayout(16, 64, bits, value_group_size=32, key_groups=key_groups)
    k, v = kivi_like(16, 64, seed=1)
    packed = layout.quantize_blocks(k[None], v[None])
    assert sum(t.numel() * t.element_size() for t in packed) == layout.packed_bytes
    assert [tuple(t.shape) for t in packed] == [tuple(t.shape) for t in layout.empty(1)]
    codes = 2 * packed_len(16 * 64, bits)
    params = (64 if key_groups == "channel" else 16 * 2) * 4 + 16 * 2 * 4
    assert layout.packed_bytes == codes + params


@pytest.mark.parametrize("bits", BITS)
def test_per_token_key_groups_within_bound(bits: int) -> None:
    layout = KIVILayout(block_size=16, head_dim=32, bits=bits, value_group_size=8, key_groups="token")
    k, v = kivi_like(16, 32, seed=bits)
    k_hat, v_hat = layout.dequantize_blocks(layout.quantize_blocks(k[None], v[None]), torch.float32)
    check_values_per_token(k, k_hat[0], bits, group=8)  # keys grouped as values are
    check_values_per_token(v, v_hat[0], bits, group=8)


def test_three_bit_keys_per_channel_within_bound() -> None:
    layout = KIVILayout(block_size=16, head_dim=32, bits=3, value_group_size=8)
    k, v = kivi_like(16, 32, seed=3)
    k_hat, v_hat = layout.dequantize_blocks(layout.quantize_blocks(k[None], v[None]), torch.float32)
    check_keys_per_channel(k, k_hat[0], 3)
    check_values_per_token(v, v_hat[0], 3, group=8)


def test_a_pinned_block_stays_open_until_freed() -> None:
    bs, d = 4, 8
    pool = QuantizedBlockPool(4, 4, bs, d, bits=3, rotate=True)
    ids = pool.allocate(2)
    data = [kivi_like(bs, d, seed=i) for i in range(2)]
    for i, (k, v) in enumerate(data):
        pool.write(block_slots(ids[i : i + 1], bs), k, v)
    pool.pin(ids[1:])
    sealed = pool.seal(ids)
    assert bool(pool.is_sealed(sealed[:1]).all()) and int(sealed[1]) == int(ids[1])
    assert pool.num_used_open_blocks == 1 and pool.num_used_packed_blocks == 1
    k1, v1 = pool.read(block_slots(sealed[1:], bs))
    assert torch.equal(k1, data[1][0]) and torch.equal(v1, data[1][1])  # full precision, untouched
    pool.check_invariants()
    with pytest.raises(ValueError, match="sealed or free"):
        pool.pin(sealed[:1])
    pool.release(sealed)
    assert pool.num_pinned_blocks == 0 and pool.num_used_blocks == 0
    pool.check_invariants()
    with pytest.raises(ValueError, match="sealed or free"):
        pool.pin(ids[1:])
    reused = pool.allocate(2)  # a freed pinned block comes back unpinned: it seals again
    for i in range(2):
        pool.write(block_slots(reused[i : i + 1], bs), *data[i])
    assert bool(pool.is_sealed(pool.seal(reused)).all())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(kv_bits=5), r"kv_bits must be 0 \(off\), 2, 3, 4 or 8, got 5"),
        (dict(kv_bits=1), r"kv_bits must be 0 \(off\), 2, 3, 4 or 8, got 1"),
        (dict(kv_bits=2, kv_key_groups="row"), "kv_key_groups must be 'channel' or 'token', got 'row'"),
        (dict(kv_key_groups="token"), "set kv_bits too"),
    ],
)
def test_cache_config_names_bad_quantization_options(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        CacheConfig(**kwargs)


def test_cli_flags_are_derived_from_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_config_args(parser, CacheConfig, {})
    args = parser.parse_args(["--kv-bits", "3", "--kv-rotate", "--kv-key-groups", "token"])
    cfg = config_from_args(CacheConfig, args)
    assert (cfg.kv_bits, cfg.kv_rotate, cfg.kv_key_groups) == (3, True, "token")
    assert config_from_args(CacheConfig, parser.parse_args([])).kv_rotate is False


@pytest.mark.parametrize("rotate", [False, True])
def test_kept_decoded_rows_read_as_dequantizing_every_time(rotate: bool) -> None:
    """keep_decoded: the same rows as a pool that dequantizes on each read, also after packed ids are reused."""
    pools = [QuantizedBlockPool(6, 4, 4, 16, bits=3, rotate=rotate) for _ in range(2)]
    pools[1].keep_decoded()
    gen = torch.Generator().manual_seed(3)
    for _round in range(3):  # seal, read, free: the next round's seals reuse the freed packed ids
        sealed = []
        for pool in pools:
            gen_state = gen.get_state()
            blocks = pool.allocate(3)
            slots = block_slots(blocks, 4)
            pool.write(slots, torch.randn(12, 16, generator=gen), torch.randn(12, 16, generator=gen))
            sealed.append(pool.seal(blocks[:2]))
            gen.set_state(gen_state)
        gen.manual_seed(int(torch.randint(0, 2**30, (1,), generator=gen)))
        assert torch.equal(sealed[0], sealed[1])
        read_slots = torch.cat([block_slots(sealed[0], 4), block_slots(torch.tensor([blocks[2]]), 4)])
        read_slots = read_slots[torch.randperm(read_slots.numel(), generator=gen)]
        for _ in range(2):  # the second read comes from the kept rows
            (k0, v0), (k1, v1) = pools[0].read(read_slots), pools[1].read(read_slots)
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
        for pool, ids in zip(pools, sealed, strict=True):
            pool.release(torch.cat([ids, blocks[2:]]))
            pool.check_invariants()
