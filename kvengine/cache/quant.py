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
at 4 bits, 1 at 8 bits, and 8 codes per 3 bytes at 3 bits (a 24-bit word,
code i at bits [3i, 3i + 3), stored low byte first).

Two options of the layout (`KIVILayout`):

- `key_groups="token"`: keys are grouped like values, per token and group of
  `value_group_size` channels, instead of per channel (KIVI's choice, right
  for keys with outlier channels; per-token groups suit rotated keys, whose
  channels are alike).
- `rotate=True`: keys and values are rotated (`rotate.py`: a randomized
  Hadamard transform, orthogonal) before they are quantized and rotated back
  when dequantized. The rotation is undone on read rather than folded into
  the queries and the attention output: every attention path reads keys and
  values through the pool (the packed pool has no fused kernel), so undoing
  it there keeps attention, presses and the decode path unchanged, and it
  costs one D log D transform per row dequantized, next to the dequantization
  itself. The error is then bounded per row rather than per element: the
  rotation is orthogonal, so a row's L2 error is that of its rotated codes.

This module holds pure functions and the byte layout; which block lives where
is the business of `quant_pool.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from kvengine.cache.rotate import check_rotatable, rotate, unrotate
from kvengine.errors import InvalidRequestError

SUPPORTED_BITS = (2, 3, 4, 8)
KEY_GROUPS = ("channel", "token")  # keys per channel (KIVI) or per token and channel group
SCALE_DTYPE = torch.float16  # scales and zero points, as stored
_SCALE_BYTES = 2


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise InvalidRequestError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")


def _word(bits: int) -> tuple[int, int]:
    """(bytes, codes) of the smallest run of whole bytes that holds whole codes: (1, 4) at 2 bits, (3, 8) at 3."""
    word_bits = bits * 8 // math.gcd(bits, 8)
    return word_bits // 8, word_bits // bits


def packed_len(num_codes: int, bits: int) -> int:
    """Bytes that `num_codes` codes of `bits` bits take once packed."""
    _check_bits(bits)
    word_bytes, per_word = _word(bits)
    return -(-num_codes // per_word) * word_bytes


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes `(..., n)` (uint8, each < 2**bits) into bytes `(..., packed_len(n, bits))`.

    Code i of a word sits at bits `[i * bits, (i + 1) * bits)` of it; a word
    of several bytes is stored low byte first. A last word that is not full
    is padded with zero codes.
    """
    _check_bits(bits)
    word_bytes, per_word = _word(bits)
    n = codes.shape[-1]
    pad = -(-n // per_word) * per_word - n
    if pad:
        codes = torch.nn.functional.pad(codes, (0, pad))
    grouped = codes.to(torch.int32).unflatten(-1, (-1, per_word))  # (..., n_words, per_word)
    shifts = torch.arange(0, bits * per_word, bits, dtype=torch.int32, device=codes.device)
    # The codes of one word occupy disjoint bits, so their sum is their bitwise or.
    words = (grouped << shifts).sum(-1, dtype=torch.int32)  # (..., n_words), at most 24 bits
    byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32, device=codes.device)
    return ((words.unsqueeze(-1) >> byte_shifts) & 0xFF).flatten(-2).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, num_codes: int) -> torch.Tensor:
    """Inverse of `pack_bits`: bytes `(..., n_bytes)` to uint8 codes `(..., num_codes)`."""
    _check_bits(bits)
    word_bytes, per_word = _word(bits)
    mask = (1 << bits) - 1
    if word_bytes == 1:
        shifts8 = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts8) & mask).flatten(-2)[..., :num_codes]
    grouped = packed.to(torch.int32).unflatten(-1, (-1, word_bytes))  # (..., n_words, word_bytes)
    byte_shifts = torch.arange(0, 8 * word_bytes, 8, dtype=torch.int32, device=packed.device)
    words = (grouped << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(0, bits * per_word, bits, dtype=torch.int32, device=packed.device)
    codes = (words.unsqueeze(-1) >> shifts) & mask  # (..., n_words, per_word)
    return codes.flatten(-2)[..., :num_codes].to(torch.uint8)


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
    k_scale: torch.Tensor  # (N, D) float16 per channel, or (N, block_size, D // group) per token and group
    k_zero: torch.Tensor  # same shape as k_scale
    v_codes: torch.Tensor  # (N, value_code_bytes) uint8
    v_scale: torch.Tensor  # (N, block_size, D // value_group_size) float16: per token and group
    v_zero: torch.Tensor  # (N, block_size, D // value_group_size) float16


@dataclass(frozen=True)
class KIVILayout:
    """Shape and byte layout of one packed block; quantizes and restores whole blocks.

    `value_group_size` None means min(32, head_dim). `head_dim` must be a
    multiple of it. `key_groups` "channel" is KIVI's (keys per channel),
    "token" groups keys as values are grouped. `rotate` rotates keys and
    values before quantizing (see the module doc); it needs a head_dim that is
    a power of two.
    """

    block_size: int
    head_dim: int
    bits: int = 2
    value_group_size: int | None = None
    key_groups: str = "channel"
    rotate: bool = False

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
        if self.key_groups not in KEY_GROUPS:
            raise InvalidRequestError(f"key_groups must be one of {KEY_GROUPS}, got {self.key_groups!r}")
        if self.rotate:
            check_rotatable(self.head_dim)

    @property
    def group(self) -> int:
        """Value channels (and, with per-token key groups, key channels) that share one scale and zero point."""
        assert self.value_group_size is not None  # resolved in __post_init__
        return self.value_group_size

    @property
    def code_bytes(self) -> int:
        """Packed bytes of the codes of one block's keys (the same for its values)."""
        return packed_len(self.block_size * self.head_dim, self.bits)

    @property
    def packed_bytes(self) -> int:
        """Bytes of one packed block: key and value codes, scales and zero points."""
        per_token = 2 * self.block_size * (self.head_dim // self.group) * _SCALE_BYTES
        key_params = 2 * self.head_dim * _SCALE_BYTES if self.key_groups == "channel" else per_token
        return 2 * self.code_bytes + key_params + per_token

    def _key_param_shape(self) -> tuple[int, ...]:
        if self.key_groups == "channel":
            return (self.head_dim,)
        return (self.block_size, self.head_dim // self.group)

    def empty(self, num_blocks: int, device: torch.device | str = "cpu") -> PackedBlocks:
        """Zeroed storage for `num_blocks` packed blocks (zeros: a free block reads as zeros)."""
        n, bs, d = num_blocks, self.block_size, self.head_dim
        groups = d // self.group
        key_params = (n, *self._key_param_shape())
        return PackedBlocks(
            k_codes=torch.zeros(n, self.code_bytes, dtype=torch.uint8, device=device),
            k_scale=torch.zeros(key_params, dtype=SCALE_DTYPE, device=device),
            k_zero=torch.zeros(key_params, dtype=SCALE_DTYPE, device=device),
            v_codes=torch.zeros(n, self.code_bytes, dtype=torch.uint8, device=device),
            v_scale=torch.zeros(n, bs, groups, dtype=SCALE_DTYPE, device=device),
            v_zero=torch.zeros(n, bs, groups, dtype=SCALE_DTYPE, device=device),
        )

    def _per_token(self, x: torch.Tensor) -> Quantized:
        """`x` `(N, bs, D)` quantized per token and group; scale and zero `(N, bs, D // group)`."""
        q = quantize(x.unflatten(-1, (-1, self.group)), self.bits, dim=-1)
        return Quantized(q.codes, q.scale.squeeze(-1), q.zero.squeeze(-1))

    def quantize_blocks(self, k: torch.Tensor, v: torch.Tensor) -> PackedBlocks:
        """Pack full blocks of keys and values `(N, block_size, head_dim)`."""
        n = k.shape[0]
        if self.rotate:
            k, v = rotate(k), rotate(v)
        if self.key_groups == "channel":
            kq = quantize(k, self.bits, dim=1)  # groups along tokens: per channel
            kq = Quantized(kq.codes, kq.scale.squeeze(1), kq.zero.squeeze(1))
        else:
            kq = self._per_token(k)
        vq = self._per_token(v)
        return PackedBlocks(
            k_codes=pack_bits(kq.codes.reshape(n, -1), self.bits),
            k_scale=kq.scale,
            k_zero=kq.zero,
            v_codes=pack_bits(vq.codes.reshape(n, -1), self.bits),
            v_scale=vq.scale,
            v_zero=vq.zero,
        )

    def dequantize_blocks(self, p: PackedBlocks, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(N, block_size, head_dim)` in `dtype` from packed blocks."""
        n, bs, d = p.k_codes.shape[0], self.block_size, self.head_dim
        work = torch.float32 if self.rotate else dtype  # rotate back before rounding to `dtype`
        k_codes = unpack_bits(p.k_codes, self.bits, bs * d)
        if self.key_groups == "channel":
            kq = Quantized(k_codes.view(n, bs, d), p.k_scale.unsqueeze(1), p.k_zero.unsqueeze(1))
            k = dequantize(kq, work)
        else:
            kq = Quantized(
                k_codes.view(n, bs, -1, self.group), p.k_scale.unsqueeze(-1), p.k_zero.unsqueeze(-1)
            )
            k = dequantize(kq, work).flatten(-2)
        v_codes = unpack_bits(p.v_codes, self.bits, bs * d).view(n, bs, d // self.group, self.group)
        v = dequantize(Quantized(v_codes, p.v_scale.unsqueeze(-1), p.v_zero.unsqueeze(-1)), work).flatten(-2)
        if self.rotate:
            return unrotate(k).to(dtype), unrotate(v).to(dtype)
        return k, v
