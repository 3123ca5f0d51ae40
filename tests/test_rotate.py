"""Rotated low-bit storage: the randomized Hadamard rotation against a dense float64 reference,
its round trip, and the error of rotated packed blocks against a float64 reference.

Bound checked for rotated blocks (see `kvengine/cache/quant.py`): with y = R x the rotated
row and b_c the per-element bound of y's channel c in its group (the KIVI bound
`s / 2 + (2**bits - 1) * |s - s16| + |z - z16|`, s, z the exact min-max scale and zero
of the group of y, s16, z16 their float16 roundings), R orthogonal gives, per row,

    ||x - x_hat||_2 = ||y - y_hat||_2 <= sqrt(sum_c b_c**2)  (+ 1e-5 * ||x||_2 float32 slack).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quant import naive_bound

from kvengine.cache.quant import KIVILayout
from kvengine.cache.rotate import random_signs, rotate, unrotate, walsh_hadamard
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.errors import InvalidRequestError

BITS = (2, 3, 4, 8)


def sylvester(d: int) -> torch.Tensor:
    """The Hadamard matrix of order d (a power of two), float64, by Kronecker products."""
    h = torch.ones(1, 1, dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, base)
    return h


def dense_rotation(d: int, seed: int = 0) -> torch.Tensor:
    """R as a dense float64 matrix acting on rows: y = x @ R^T = x @ diag(s) H / sqrt(d)."""
    return torch.diag(random_signs(d, seed).double()) @ sylvester(d) / math.sqrt(d)


@pytest.mark.parametrize("d", [1, 2, 4, 8, 16, 64, 128])
def test_fast_transform_equals_the_dense_hadamard_matrix(d: int) -> None:
    x = torch.randn(5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(d))
    torch.testing.assert_close(walsh_hadamard(x), x @ sylvester(d), rtol=0, atol=1e-12)
    r = dense_rotation(d)
    torch.testing.assert_close(r @ r.T, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    log_d=st.integers(0, 8),
    rows=st.integers(1, 6),
    scale=st.floats(1e-3, 1e3),
    seed=st.integers(0, 2**16),
)
def test_rotation_round_trips_within_float_tolerance(log_d: int, rows: int, scale: float, seed: int) -> None:
    d = 2**log_d
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(seed)) * scale
    y = rotate(x, seed % 7)
    reference = x.double() @ dense_rotation(d, seed % 7)
    tol = 1e-6 * scale * math.sqrt(d)
    assert float((y.double() - reference).abs().max()) <= tol
    assert float((unrotate(y, seed % 7) - x).abs().max()) <= tol
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)
    # float64 in, float64 out: the round trip is exact to float64 rounding.
    assert float((unrotate(rotate(x.double())) - x.double()).abs().max()) <= 1e-12 * scale * d


def outlier_rows(n: int, d: int, seed: int) -> torch.Tensor:
    """Rows with two outlier channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 3] = 20 + 4 * torch.randn(n, generator=g)
    x[:, d // 2] = -12 + 2 * torch.randn(n, generator=g)
    return x


def row_bounds(x: torch.Tensor, layout: KIVILayout, keys: bool) -> torch.Tensor:
    """The stated per-row L2 bound `(bs,)` for one block `x` `(bs, D)` stored rotated."""
    y = x.double() @ dense_rotation(x.shape[1])  # (bs, D), the float64 reference of what is quantized
    bound = torch.empty_like(y)
    if keys and layout.key_groups == "channel":
        for c in range(y.shape[1]):
            bound[:, c] = naive_bound(y[:, c], layout.bits)
    else:
        for t in range(y.shape[0]):
            for g in range(0, y.shape[1], layout.group):
                bound[t, g : g + layout.group] = naive_bound(y[t, g : g + layout.group], layout.bits)
    return bound.pow(2).sum(1).sqrt() + 1e-5 * x.double().norm(dim=1)


@pytest.mark.parametrize("key_groups", ["channel", "token"])
@pytest.mark.parametrize("bits", BITS)
def test_rotated_blocks_dequantize_within_the_row_bound(bits: int, key_groups: str) -> None:
    bs, d = 16, 64
    layout = KIVILayout(bs, d, bits, value_group_size=16, key_groups=key_groups, rotate=True)
    k, v = outlier_rows(bs, d, seed=bits), torch.randn(bs, d, generator=torch.Generator().manual_seed(9))
    k_hat, v_hat = layout.dequantize_blocks(layout.quantize_blocks(k[None], v[None]), torch.float32)
    for x, x_hat, keys in ((k, k_hat[0], True), (v, v_hat[0], False)):
        err = (x.double() - x_hat.double()).norm(dim=1)
        bound = row_bounds(x, layout, keys)
        assert bool((err <= bound).all()), f"row errors {err.tolist()} over bounds {bound.tolist()}"


@pytest.mark.parametrize("bits", [2, 3])
def test_rotation_spreads_outlier_channels_of_per_token_groups(bits: int) -> None:
    """Per-token groups stretch over an outlier channel; rotated, the error is at least 2x smaller."""
    k = outlier_rows(32, 64, seed=1)[None]
    errors = {}
    for rotated in (False, True):
        layout = KIVILayout(32, 64, bits, value_group_size=32, key_groups="token", rotate=rotated)
        k_hat, _ = layout.dequantize_blocks(layout.quantize_blocks(k, k), torch.float32)
        errors[rotated] = float((k_hat - k).pow(2).mean())
    assert errors[True] < errors[False] / 2, errors


def test_rotation_needs_a_power_of_two_head_dim() -> None:
    with pytest.raises(InvalidRequestError, match=r"power of two.*got 48"):
        KIVILayout(4, 48, 2, value_group_size=16, rotate=True)
    with pytest.raises(InvalidRequestError, match=r"power of two.*got 12"):
        Engine(tiny_model("llama", head_dim=12), CacheConfig(block_size=4, kv_bits=2, kv_rotate=True))
    with pytest.raises(InvalidRequestError, match="set kv_bits too"):
        CacheConfig(kv_rotate=True)


@pytest.mark.parametrize("key_groups", ["channel", "token"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotated_cache_in_the_engine_stays_close_to_the_float_cache(bits: int, key_groups: str) -> None:
    """Rotation is undone on read: the engine's logits stay near the float cache's, as KIVI's do."""
    from test_engine import random_prompt

    from kvengine.engine.runner import StepInput

    m = tiny_model("llama")
    prompt = random_prompt(101, 4)
    configs = {
        "float": CacheConfig(block_size=8, max_kv_bytes=8 * 2**20),
        "rotated": CacheConfig(
            block_size=8, max_kv_bytes=8 * 2**20, kv_bits=bits, kv_rotate=True, kv_key_groups=key_groups
        ),
    }
    logits = {}
    for name, cfg in configs.items():
        engine = Engine(m, cfg)
        kv = engine.cache.new_sequence()
        engine.runner.forward([StepInput(kv, prompt, 0)])
        logits[name] = engine.runner.forward([StepInput(kv, [7], len(prompt))])[0]
        engine.cache.free(kv)
        assert engine.pool.num_used_blocks == 0
    error = float((logits["rotated"] - logits["float"]).abs().max() / logits["float"].abs().max())
    assert error < {2: 0.15, 3: 0.06, 4: 0.03}[bits], f"relative logit error {error:.4f}"
