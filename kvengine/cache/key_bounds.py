"""Per-block key bounds: the per-channel minimum and maximum of the keys each block holds.

The metadata of query-aware block selection (Quest, Tang et al. 2024,
arXiv:2406.10774): for a block of keys K and a query q, `sum_d max(q_d *
min_d, q_d * max_d)` bounds `q . k` from above for every key k of the block,
so a decoding step can rank blocks without reading them
(`kvengine.engine.selection`).

A `KeyBounds` is a side structure of a pool, keyed by block id, kept up to
date by the pool itself: every `write` folds the written keys into their
blocks' bounds and every allocation resets the blocks it hands out, so a
block's bounds cover exactly the keys written into it since it was taken.
It costs `2 * head_dim` values of the pool's dtype per block (1/block_size
of the block's keys and values). It knows nothing about queries or
sequences.
"""

from __future__ import annotations

import warnings

import torch

# index_reduce_ is marked beta in torch 2.x; its contract (a reduction per index) is all this module uses.
warnings.filterwarnings("ignore", message=r"index_reduce\(\) is in beta")


class KeyBounds:
    """Per-channel key minimum and maximum of every block `(num_blocks + 1, head_dim)`.

    Row `num_blocks` belongs to no block: it is what padding entries of a
    slot table (the pool's zero slot, `num_blocks * block_size`) map to, and
    holds zeros. An empty block has min +inf and max -inf.
    """

    def __init__(
        self, num_blocks: int, block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.block_size = block_size
        # torch.empty: rows are only touched when their block is taken (reset) or written.
        self.min = torch.empty(num_blocks + 1, head_dim, dtype=dtype, device=device)
        self.max = torch.empty(num_blocks + 1, head_dim, dtype=dtype, device=device)
        self.min[num_blocks].zero_()
        self.max[num_blocks].zero_()

    @property
    def bytes_per_block(self) -> int:
        return 2 * self.min.shape[1] * self.min.element_size()

    def reset(self, block_ids: torch.Tensor) -> None:
        """Forget what the blocks held (they were just taken from the free list)."""
        block_ids = block_ids.to(self.min.device)
        self.min[block_ids] = float("inf")
        self.max[block_ids] = float("-inf")

    def update(self, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold keys `(N, head_dim)` written at flat slots `(N,)` into their blocks' bounds."""
        rows = slots.to(self.min.device) // self.block_size
        keys = keys.to(self.min.device, self.min.dtype)
        # index_reduce_ takes one index per row: ~20x faster on a CPU than scatter_reduce_'s per element.
        self.min.index_reduce_(0, rows, keys, "amin", include_self=True)
        self.max.index_reduce_(0, rows, keys, "amax", include_self=True)

    def upper_bound(self, q: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """Upper bounds of `q . k` over each block's keys: q `(..., G, D)`, ids `(..., B)` -> `(..., G, B)`.

        In float32: `sum_d max(q_d * min_d, q_d * max_d)`; an empty block
        bounds nothing (-inf or nan: callers mask blocks past a cell's end).
        """
        block_ids = block_ids.to(self.min.device)
        lo = self.min[block_ids].float()  # (..., B, D)
        hi = self.max[block_ids].float()
        qf = q.float()
        # q_d >= 0 picks the channel's maximum, q_d < 0 its minimum: two matmuls instead of a max.
        pos, neg = qf.clamp_min(0), qf.clamp_max(0)
        return pos @ hi.transpose(-1, -2) + neg @ lo.transpose(-1, -2)

    def group_upper_bound(self, q: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """`upper_bound` summed over the query heads G: q `(N, H, G, D)`, ids `(N, H, B)` -> `(N, H, B)`.

        The group is summed before the bounds are read, which is exact (each
        term is `q_d * max_d` for `q_d >= 0`, else `q_d * min_d`): one batched
        matrix-vector product per bound over every cell of the batch at once,
        with the rows of all blocks gathered by one `index_select` each.
        """
        n, num_heads, num_blocks = block_ids.shape
        rows = block_ids.to(self.min.device).reshape(-1)
        lo = self.min.index_select(0, rows).view(n * num_heads, num_blocks, -1).float()  # (N*H, B, D)
        hi = self.max.index_select(0, rows).view(n * num_heads, num_blocks, -1).float()
        qf = q.float()
        pos = qf.clamp_min(0).sum(2).view(n * num_heads, -1, 1)  # (N*H, D, 1)
        neg = qf.clamp_max(0).sum(2).view(n * num_heads, -1, 1)
        return torch.baddbmm(hi @ pos, lo, neg).view(n, num_heads, num_blocks)
