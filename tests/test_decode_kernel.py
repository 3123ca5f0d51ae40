"""Decode attention over the pool in place (kernel.py / paged_decode.cpp) and its gather fallback.

Both are checked against a float64 dense reference built from the same
slots: ragged per-head lengths, grouped query heads, sliding windows over
recorded positions, 16- and 32-bit pools, and garbage (NaN) in every slot a
sequence does not own. Engine-level greedy equality with transformers, on
the kernel, is covered by the engine tests, which run on it by default.
"""

from __future__ import annotations

import pytest
import torch

from kvengine.cache.pool import BlockPool
from kvengine.engine import kernel as kernel_module
from kvengine.engine.attention import DecodeBatch, ForwardContext, _decode
from kvengine.engine.kernel import paged_decode

KERNEL = paged_decode()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the decode kernel could not be built here")


def _case(dtype: torch.dtype, seed: int, window: int | None, n: int = 5, max_len: int = 40):
    """A pool full of NaN but for the random rows the sequences own, and their tables."""
    gen = torch.Generator().manual_seed(seed)
    h_kv, group, d, layers = 3, 3, 16, 2
    blocks = max(400, layers * n * h_kv * max_len // 4 + 1)
    pool = BlockPool(blocks, block_size=4, head_dim=d, dtype=dtype)
    pool.allocate(blocks)
    pool.k[:-1] = float("nan")
    pool.v[:-1] = float("nan")
    lens = torch.randint(1, max_len, (layers, n, h_kv), generator=gen)
    width = int(lens.max())
    perm = torch.randperm(4 * blocks - 1, generator=gen)[: layers * n * h_kv * width].view(
        layers, n, h_kv, width
    )
    valid = torch.arange(width) < lens[..., None]
    slots = torch.where(valid, perm, pool.zero_slot)
    rows = slots[valid]
    pool.k[rows] = torch.randn(rows.numel(), d, generator=gen).to(dtype)
    pool.v[rows] = torch.randn(rows.numel(), d, generator=gen).to(dtype)
    # Positions increase along a cell but skip (a press evicted tokens in between).
    positions = torch.randint(1, 4, (layers, n, h_kv, width), generator=gen).cumsum(-1)
    q = torch.randn(n, h_kv * group, d, generator=gen).to(dtype)
    batch = DecodeBatch(slice(0, n), slots, lens, positions if window else None)
    return pool, batch, q


def _reference(
    pool: BlockPool, batch: DecodeBatch, layer: int, q: torch.Tensor, scale: float, window: int | None
):
    n, num_heads, d = q.shape
    h_kv = batch.slots.shape[2]
    group = num_heads // h_kv
    out = torch.zeros(n, num_heads, d, dtype=torch.float64)
    for i in range(n):
        for h in range(h_kv):
            length = int(batch.lens[layer, i, h])
            slots = batch.slots[layer, i, h, :length]
            k, v = pool.k[slots].double(), pool.v[slots].double()
            seen = torch.ones(length, dtype=torch.bool)
            if window is not None and batch.positions is not None:
                pos = batch.positions[layer, i, h, :length]
                seen = pos > pos[-1] - window
            for g in range(group):
                qh = q[i, h * group + g].double()
                scores = (k @ qh) * scale
                scores[~seen] = float("-inf")
                out[i, h * group + g] = torch.softmax(scores, 0) @ v
    return out


PATHS = ["kernel", "gather"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("window", [None, 7])
def test_decode_attention_matches_a_float64_reference(
    path: str, dtype: torch.dtype, window: int | None
) -> None:
    if path == "kernel" and KERNEL is None:
        pytest.skip("the decode kernel could not be built here")
    pool, batch, q = _case(dtype, seed=3, window=window)
    ctx = ForwardContext(pool, [], torch.empty(0), decode=batch, kernel=KERNEL if path == "kernel" else None)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    for layer in range(batch.slots.shape[0]):
        got = _decode(ctx, batch, layer, q, 0.25, window)
        assert got.dtype == dtype and not bool(got.isnan().any())
        want = _reference(pool, batch, layer, q, 0.25, window)
        torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 300])
def test_one_sequence_split_over_threads_matches_the_reference(
    dtype: torch.dtype, window: int | None
) -> None:
    """Batch 1 (3 cells, fewer than twice the threads): each cell's tokens are split into ranges on
    different threads and merged; some cells are shorter than a range (empty ranges)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool, batch, q = _case(dtype, seed=5, window=window, n=1, max_len=1300)
        batch.lens[0, 0, 0] = 3  # far shorter than the split ranges
        tol = 2e-5 if dtype == torch.float32 else 2e-2
        for layer in range(batch.slots.shape[0]):
            slots, lens = batch.slots[layer], batch.lens[layer]
            positions = batch.positions[layer] if window else None
            got = KERNEL(q, pool.k, pool.v, slots, lens, positions, window or 0, 0.25)  # type: ignore[misc]
            want = _reference(pool, batch, layer, q, 0.25, window)
            torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_the_kernel_refuses_a_slot_outside_the_pool() -> None:
    pool, batch, q = _case(torch.float32, seed=1, window=None)
    slots = batch.slots[0].clone()
    slots[0, 0, 0] = pool.k.shape[0] + 5
    with pytest.raises(RuntimeError, match="outside the pool"):
        KERNEL(q, pool.k, pool.v, slots, batch.lens[0], None, 0, 0.25)  # type: ignore[misc]


@needs_kernel
def test_the_kernel_refuses_mismatched_shapes() -> None:
    pool, batch, q = _case(torch.float32, seed=1, window=None)
    with pytest.raises(RuntimeError, match="disagree"):
        KERNEL(q[:2], pool.k, pool.v, batch.slots[0], batch.lens[0], None, 0, 0.25)  # type: ignore[misc]
    with pytest.raises(RuntimeError, match="dtype"):
        KERNEL(q.double(), pool.k, pool.v, batch.slots[0], batch.lens[0], None, 0, 0.25)  # type: ignore[misc]


def test_switched_off_the_kernel_is_not_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVENGINE_KERNEL", "off")
    assert kernel_module.disabled_reason() == "KVENGINE_KERNEL is off"
    kernel_module.paged_decode.cache_clear()
    try:
        assert kernel_module.paged_decode() is None
    finally:
        kernel_module.paged_decode.cache_clear()


def test_no_kernel_for_a_packed_pool_or_another_device() -> None:
    assert kernel_module.decode_kernel_for(torch.device("cpu"), seals_blocks=True) is None
    assert kernel_module.decode_kernel_for(torch.device("meta"), seals_blocks=False) is None


@needs_kernel
@pytest.mark.parametrize("source", ["paged_decode.cpp", "small_linear.cpp", "select_kernel.cpp"])
def test_the_kernels_are_built_to_run_on_every_thread(source: str) -> None:
    """`at::parallel_for` is an inline template whose `omp parallel` only exists when the extension
    itself is compiled with OpenMP; without it every kernel silently runs on one thread."""
    from pathlib import Path

    from kvengine.engine.linear import small_linear_op
    from kvengine.engine.select_kernel import select_op

    assert small_linear_op() is not None and select_op() is not None
    built = list(kernel_module.build_dir(Path(kernel_module.__file__).with_name(source)).glob("*.so"))
    assert len(built) == 1
    assert b"GOMP_parallel" in built[0].read_bytes()
