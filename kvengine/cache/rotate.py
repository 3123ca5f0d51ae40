"""A fixed random orthogonal rotation of key/value rows: the randomized Hadamard transform.

QuaRot (Ashkboos et al. 2024, arXiv:2404.00456) and TurboQuant (Zandieh et
al. 2025, arXiv:2504.19874) rotate keys and values by a random orthogonal
matrix before low-bit quantization: a channel that holds an outlier is spread
over all channels, so a min-max group no longer stretches its scale over one
large value. The rotation here is

    R x = H (s * x) / sqrt(D),

with `s` a fixed vector of random signs (one per channel, from a seed) and H
the Sylvester-Hadamard matrix of order D, applied as one matrix product
(faster than the D log D butterflies at head sizes). H / sqrt(D) is symmetric and orthogonal, so
the inverse is `s * (H y) / sqrt(D)`. D must be a power of two.

This module is the rotation only: which storage applies it, and when it is
undone, is `quant.py`'s business.
"""

from __future__ import annotations

import functools
import math

import torch

from kvengine.errors import InvalidRequestError


def check_rotatable(head_dim: int) -> None:
    """Raise InvalidRequestError unless `head_dim` is a power of two (what a Hadamard transform needs)."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        raise InvalidRequestError(
            f"kv_rotate needs a head_dim that is a power of two (a Hadamard transform), got {head_dim}; "
            "turn kv_rotate off for this model"
        )


@functools.cache
def random_signs(head_dim: int, seed: int = 0) -> torch.Tensor:
    """The fixed signs `(head_dim,)` float32 (+1 or -1) of the rotation with this seed."""
    check_rotatable(head_dim)
    # Drawn on the host (the same signs on every device), moved to the rows' device by `rotate`.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, 2, (head_dim,), generator=gen, device="cpu").float() * 2 - 1


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """`x @ H` for rows `(..., D)`, H the unnormalized Sylvester-Hadamard matrix (D a power of two).

    One matrix product with H (cached per size, dtype and device): at head
    sizes (D <= 256) a GEMM beats the log D butterfly passes by an order of
    magnitude on a CPU, and a packed pool applies this on every read. Entries
    of H are +-1, so the result is exact up to the summation order's rounding.
    """
    d = x.shape[-1]
    check_rotatable(d)
    return x @ _hadamard(d, x.dtype, x.device)


@functools.cache
def _hadamard(d: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The Sylvester-Hadamard matrix `(d, d)` of +-1, built by the butterfly recursion H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h.to(dtype=dtype, device=device)


def rotate(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`R x` for rows `(..., D)`, computed in float32 (float64 stays float64)."""
    xf = x if x.dtype == torch.float64 else x.float()
    signs = random_signs(x.shape[-1], seed).to(device=x.device, dtype=xf.dtype)
    return walsh_hadamard(xf * signs) / math.sqrt(x.shape[-1])


def unrotate(y: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """`R^T y`, the inverse of `rotate` for the same seed."""
    yf = y if y.dtype == torch.float64 else y.float()
    signs = random_signs(y.shape[-1], seed).to(device=y.device, dtype=yf.dtype)
    return walsh_hadamard(yf) * signs / math.sqrt(y.shape[-1])
