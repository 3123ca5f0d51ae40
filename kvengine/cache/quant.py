"""Packed low-bit key/value storage: KIVI's quantization rule and bit packing.

KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization for
KV Cache", arXiv:2402.02750) quantizes keys per channel and values per token,
with asymmetric min-max quantization to `bits` bits:

    scale = (max - min) / (2**bits - 1),  zero = min,
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1),
    x_hat = code * scale + zero.

In kvengine's terms one block (`block_size` tokens of one (layer, kv-head)) is
one key group along tokens: each of the `head_dim` key channels of a block
shares one scale and zero point. Each token of a block has its own value
scale and zero point per group of `value_group_size` channels.

Scales and zero points are stored in float16 (as KIVI does). Codes are
computed against the float16-rounded scale and zero point, so they are the
best codes for what is stored; the error per element is then at most

    s / 2 + (2**bits - 1) * |s - s16| + |z - z16|

where s, z are the exact min-max scale and zero and s16, z16 their float16
roundings (plus the rounding of the result to the output dtype).

Codes are packed into uint8, little end first: 4 codes per byte at 2 bits, 2
at 4 bits, 1 at 8 bits. This module holds pure functions and the byte layout;
which block lives where is the business of `quant_pool.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvengine.errors import InvalidRequestError

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = torch.float16  # scales and zero points, as stored
_SCALE_BYTES = 2


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InvalidRequestError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def packed_len(num_codes: int, bits: int) -> int:
    """Bytes that `num_codes` codes of `bits` bits take once packed."""
    _check_bits(bits)
    per_byte = 8 // bits
    return -(-num_codes // per_byte)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes `(..., n)` (uint8, each < 2**bits) into bytes `(..., packed_len(n, bits))`.

    Code i of a byte sits at bits `[i * bits, (i + 1) * bits)`. A last byte
    that is not full is padded with zero codes.
    """
    _check_bits(bits)
    per_byte = 8 // bits
    n = codes.shape[-1]
    pad = packed_len(n, bits) * per_byte - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per_byte))  # (..., n_bytes, per_byte)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    # The codes of one byte occupy disjoint bits, so their sum is their bitwise or.
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of `pack_bits`: bytes `(..., n_bytes)` to uint8 codes `(..., num_codes)`."""
    _check_bits(bits)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    mask = (1 << bits) - 1
    codes = (packed.unsqueeze(-1) >> shifts) & mask  # (..., n_bytes, per_byte)
    return codes.flatten(-2)[..., :num_codes]


class Quantized(NamedTuple):
    """Codes of `x`, with the float16 scale and zero point of each group (broadcastable to x)."""

    codes: torch.Tensor  # uint8, shape of x
    scale: torch.Tensor  # float16, x's shape with the grouped dims of size 1
    zero: torch.Tensor  # float16, same shape as scale


def quantize(x: torch.Tensor, bits: int, dim: int) -> Quantized:
    """Asymmetric min-max quantization of `x` to `bits` bits; one group per slice along `dim`.

    All elements that differ only in their index along `dim` share one scale
    and zero point. A constant group gets scale 0 and is stored exactly up to
    the float16 rounding of its zero point.
    """
    _check_bits(bits)
    qmax = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim, keepdim=True)
    hi = xf.amax(dim, keepdim=True)
    scale = ((hi - lo) / qmax).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    # Divide by the stored scale so the codes fit what dequantization will use;
    # a zero scale (constant group, or float16 underflow) maps everything to code 0.
    divisor = torch.where(scale == 0, 1.0, scale.float())
    codes = ((xf - zero.float()) / divisor).round_().clamp_(0, qmax).to(torch.uint8)
    if bool((scale == 0).any()):
        codes = codes.masked_fill(scale == 0, 0)
    return Quantized(codes, scale, zero)


def dequantize(q: Quantized, dtype: torch.dtype) -> torch.Tensor:
    """`codes * scale + zero`, computed in float32, returned in `dtype`."""
    return torch.addcmul(q.zero.float(), q.codes.float(), q.scale.float()).to(dtype)


class PackedBlocks(NamedTuple):
    """Packed keys and values of N blocks; every field has the blocks as its first dim."""

    k_codes: torch.Tensor  # (N, key_code_bytes) uint8
    k_scale: torch.Tensor  # (N, D) float16: per channel
    k_zero: torch.Tensor  # (N, D) float16
    v_codes: torch.Tensor  # (N, value_code_bytes) uint8
    v_scale: torch.Tensor  # (N, block_size, D // value_group_size) float16: per token and group
    v_zero: torch.Tensor  # (N, block_size, D // value_group_size) float16


@dataclass(frozen=True)
class KIVILayout:
    """Shape and byte layout of one packed block; quantizes and restores whole blocks.

    `value_group_size` None means min(32, head_dim). `head_dim` must be a
    multiple of it.
    """

    block_size: int
    head_dim: int
    bits: int = 2
    value_group_size: int | None = None

    def __post_init__(self) -> None:
        _check_bits(self.bits)
        if self.block_size < 1 or self.head_dim < 1:
            raise InvalidRequestError(
                f"block_size and head_dim must be >= 1, got {self.block_size}, {self.head_dim}"
            )
        if self.value_group_size is None:
            object.__setattr__(self, "value_group_size", min(32, self.head_dim))
        group = self.group
        if group < 1 or self.head_dim % group:
            raise InvalidRequestError(
                f"head_dim ({self.head_dim}) must be a multiple of value_group_size ({group})"
            )

    @property
    def group(self) -> int:
        """Value channels that share one scale and zero point."""
        assert self.value_group_size is not None  # resolved in __post_init__
        return self.value_group_size

    @property
    def code_bytes(self) -> int:
        """Packed bytes of the codes of one block's keys (the same for its values)."""
        return packed_len(self.block_size * self.head_dim, self.bits)

    @property
    def packed_bytes(self) -> int:
        """Bytes of one packed block: key and value codes, scales and zero points."""
        key_params = 2 * self.head_dim * _SCALE_BYTES
        value_params = 2 * self.block_size * (self.head_dim // self.group) * _SCALE_BYTES
        return 2 * self.code_bytes + key_params + value_params

    def empty(self, num_blocks: int, device: torch.device | str = "cpu") -> PackedBlocks:
        """Zeroed storage for `num_blocks` packed blocks (zeros: a free block reads as zeros)."""
        n, bs, d = num_blocks, self.block_size, self.head_dim
        groups = d // self.group
        return PackedBlocks(
            k_codes=torch.zeros(n, self.code_bytes, dtype=torch.uint8, device=device),
            k_scale=torch.zeros(n, d, dtype=SCALE_DTYPE, device=device),
            k_zero=torch.zeros(n, d, dtype=SCALE_DTYPE, device=device),
            v_codes=torch.zeros(n, self.code_bytes, dtype=torch.uint8, device=device),
            v_scale=torch.zeros(n, bs, groups, dtype=SCALE_DTYPE, device=device),
            v_zero=torch.zeros(n, bs, groups, dtype=SCALE_DTYPE, device=device),
        )

    def quantize_blocks(self, k: torch.Tensor, v: torch.Tensor) -> PackedBlocks:
        """Pack full blocks of keys and values `(N, block_size, head_dim)`."""
        n = k.shape[0]
        kq = quantize(k, self.bits, dim=1)  # groups along tokens: per channel
        vq = quantize(v.unflatten(-1, (-1, self.group)), self.bits, dim=-1)  # per token and group
        return PackedBlocks(
            k_codes=pack_bits(kq.codes.reshape(n, -1), self.bits),
            k_scale=kq.scale.squeeze(1),
            k_zero=kq.zero.squeeze(1),
            v_codes=pack_bits(vq.codes.reshape(n, -1), self.bits),
            v_scale=vq.scale.squeeze(-1),
            v_zero=vq.zero.squeeze(-1),
        )

    def dequantize_blocks(self, p: PackedBlocks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(N, block_size, head_dim)` in `dtype` from packed blocks."""
        n, bs, d = p.k_codes.shape[0], self.block_size, self.head_dim
        k_codes = unpack_bits(p.k_codes, self.bits, bs * d).view(n, bs, d)
        k = dequantize(Quantized(k_codes, p.k_scale.unsqueeze(1), p.k_zero.unsqueeze(1)), dtype)
        v_codes = unpack_bits(p.v_codes, self.bits, bs * d).view(n, bs, d // self.group, self.group)
        v = dequantize(Quantized(v_codes, p.v_scale.unsqueeze(-1), p.v_zero.unsqueeze(-1)), dtype)
        return k, v.flatten(-2)
