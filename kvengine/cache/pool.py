"""Block pools: the one owner of all key/value memory, and the contract every pool keeps.

`KVPool` states the contract that `PagedKVCache`, the attention function, the
scheduler and the prefix cache rely on, and holds the code every pool shares:
ref counts, the full-precision slots and reading and writing them. Two pools
implement it: `BlockPool` here (every block in the pool's dtype) and
`QuantizedBlockPool` (`quant_pool.py`, full blocks packed to 2, 3, 4 or 8 bits).
Callers use the contract and never ask which pool they hold.

A block is `block_size` consecutive slots and holds tokens of exactly one
(layer, kv-head); which block belongs to which sequence, layer and head is the
business of `paged.py`, not of the pool. Keeping blocks per kv-head is what
lets a press free memory head by head: a head that keeps fewer tokens holds
fewer blocks.

A pool knows nothing about models, sequences or attention. It hands out block
ids, counts references to them, and reports the bytes that blocks in use
really hold.

Devices. Keys and values live on the pool's `device` (the model's). Block
ids, ref counts and free lists are bookkeeping and live on the host (`HOST`),
as do the block tables of `paged.py`; `read` and `write` take slot indices
on either and move them to the pool's device (a no-op for the step's
tables, which the attention context moves there once per step).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from kvengine.cache.key_bounds import KeyBounds
from kvengine.errors import OutOfBlocksError

HOST = torch.device("cpu")  # where block ids, ref counts and block tables live, whatever the pool's device


class KVPool(ABC):
    """Fixed-size blocks of key/value slots with reference counts: the contract of every pool.

    Slots. Block ids run over `[0, num_blocks)`; slot `id * block_size +
    offset` holds one token's key and value, each `(head_dim,)`. The first
    `num_open_blocks` ids are open: their slots live in `k` and `v`, each
    `(num_open_blocks * block_size, head_dim)` in the pool's `dtype`. In the
    plain pool every block is open.

    References. `allocate(n)` takes `n` free open blocks, each with ref count
    1, and raises OutOfBlocksError (changing nothing) unless `can_allocate(n)`;
    `incref` adds a reference to blocks in use; `release` drops one and frees
    the blocks whose count reaches 0. `ref_counts` `(num_blocks,)` int32 is
    read-only outside the pool. Invariants (checked by `check_invariants`):
    every block is either free (ref count 0, on a free list exactly once) or in
    use (ref count >= 1, on no free list).

    Data. `write(slots, key, value)` stores rows `(N, head_dim)` into slots of
    open blocks; `read(slots)` returns rows in the pool's dtype from any block
    in use; `write_blocks` and `read_blocks` do the same for whole blocks.

    Padding. `zero_slot` (one past the last slot of any block) is a slot
    `read` always returns zeros for, never written: attention pads slot tables
    with it, so padding entries hold finite values whatever other sequences
    store (a NaN under a masked score would still poison a softmax).

    Accounting, in bytes really held: `bytes_per_block` (a block as
    `allocate` hands it out), `bytes_of(block_ids)`, `bytes_in_use`,
    `capacity_bytes`, `num_free_blocks`, `num_used_blocks`.

    Sealing. A pool whose `seals_blocks` is True stores full blocks in another,
    smaller form: `seal(block_ids)` turns full open blocks, each held by
    exactly one reference, into sealed ones and returns the ids they now have,
    in order; a sealed block is read-only (`is_sealed` tells them apart). A
    pool that does not seal has nothing to seal: its `seal` returns the ids
    unchanged. Callers that need every block to stay where it is and in the
    pool's dtype (preemption, the prefix cache's tiers) check `seals_blocks`.
    """

    seals_blocks: ClassVar[bool] = False
    label: ClassVar[str] = "KV pool"  # how errors name the pool

    def __init__(
        self,
        num_blocks: int,
        num_open_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        self.num_blocks = num_blocks
        self.num_open_blocks = num_open_blocks
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        self._open_slots = num_open_blocks * block_size  # first slot past the open range
        # torch.empty: pages are only touched when a block is written. One more row, all
        # zeros, is what `zero_slot` reads (padding of attention's slot tables).
        self.k = torch.empty(self._open_slots + 1, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(self._open_slots + 1, head_dim, dtype=dtype, device=device)
        self.k[self._open_slots].zero_()
        self.v[self._open_slots].zero_()
        self.ref_counts = torch.zeros(num_blocks, dtype=torch.int32, device=HOST)
        self.key_bounds: KeyBounds | None = None  # per-block key min/max, once `track_key_bounds()`

    @property
    def device(self) -> torch.device:
        """Where keys and values live (block ids and ref counts stay on the host)."""
        return self.k.device

    @property
    def zero_slot(self) -> int:
        """The slot `read` returns zeros for (see the class doc)."""
        return self.num_blocks * self.block_size

    # ---- accounting -------------------------------------------------------

    @property
    @abstractmethod
    def extent(self) -> str:
        """The pool's size in words, for errors: e.g. "8 blocks of 16 tokens"."""

    @property
    def bytes_per_block(self) -> int:
        """Bytes of keys plus values one open block holds (a block as `allocate` hands it out)."""
        return 2 * self.block_size * self.head_dim * self.k.element_size()

    @property
    def num_free_blocks(self) -> int:
        return sum(len(free) for free in self._free_lists())

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def bytes_in_use(self) -> int:
        """Bytes held by blocks in use: what the cache really costs."""
        return self.num_used_blocks * self.bytes_per_block

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def bytes_of(self, block_ids: torch.Tensor) -> int:
        """Bytes the given blocks hold (a block listed twice counts twice)."""
        return block_ids.numel() * self.bytes_per_block

    # ---- allocation -------------------------------------------------------

    @abstractmethod
    def can_allocate(self, num_blocks: int) -> bool:
        """True if `allocate(num_blocks)` would succeed."""

    @abstractmethod
    def allocate(self, num_blocks: int) -> torch.Tensor:
        """Take `num_blocks` free open blocks, each with ref count 1; returns their ids (int64)."""

    def incref(self, block_ids: torch.Tensor) -> None:
        """Add one reference to each block in use (a block listed twice gets two)."""
        if bool((self.ref_counts[block_ids] < 1).any()):
            raise ValueError("incref on a free block")
        self.ref_counts.index_add_(0, block_ids, torch.ones_like(block_ids, dtype=torch.int32))

    def release(self, block_ids: torch.Tensor) -> None:
        """Drop one reference to each block; blocks whose count reaches 0 are freed."""
        if block_ids.numel() == 0:
            return
        if bool((self.ref_counts[block_ids] < 1).any()):
            raise ValueError("release of a block that is already free")
        self.ref_counts.index_add_(0, block_ids, torch.full_like(block_ids, -1, dtype=torch.int32))
        self._put_back(block_ids[self.ref_counts[block_ids] == 0].unique())

    @abstractmethod
    def _free_lists(self) -> tuple[list[int], ...]:
        """Every free list, one per kind of block; each a stack whose end goes out first."""

    @abstractmethod
    def _put_back(self, freed: torch.Tensor) -> None:
        """Return blocks whose ref count just reached 0 (distinct ids) to their free lists."""

    def _take(self, free: list[int], num_blocks: int, kind: str = "") -> torch.Tensor:
        """Pop `num_blocks` ids off the free list `free`, each now with ref count 1.

        `kind` names the blocks in the error raised when `free` is short.
        """
        if num_blocks > len(free):
            raise OutOfBlocksError(
                f"the {self.label} has {len(free)} free {kind}blocks, {num_blocks} were asked for "
                f"(pool: {self.extent})"
            )
        if num_blocks == 0:
            return torch.empty(0, dtype=torch.int64, device=HOST)
        taken = free[-num_blocks:]
        del free[-num_blocks:]
        ids = torch.tensor(taken, dtype=torch.int64, device=HOST)
        self.ref_counts[ids] = 1
        if self.key_bounds is not None:
            self.key_bounds.reset(ids)
        return ids

    def track_key_bounds(self) -> KeyBounds:
        """Keep per-block key bounds from now on (query-aware block selection needs them).

        Raises ValueError if blocks are in use (their bounds would be missing)
        or if the pool seals blocks (sealing moves blocks to other ids).
        """
        if self.key_bounds is None:
            if self.seals_blocks:
                raise ValueError(f"block selection does not work over a {self.label} that seals blocks yet")
            if self.num_used_blocks:
                raise ValueError("key bounds must be tracked from an empty pool")
            self.key_bounds = KeyBounds(
                self.num_blocks, self.block_size, self.head_dim, self.dtype, self.k.device
            )
        return self.key_bounds

    # ---- sealing ----------------------------------------------------------

    def is_sealed(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask: which of `block_ids` are sealed (read-only) blocks."""
        return block_ids >= self.num_open_blocks

    def seal(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The ids `block_ids` have once sealed, in order (see the class doc); here, unchanged."""
        return block_ids

    # ---- data -------------------------------------------------------------

    def write(self, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `key`/`value` rows `(N, head_dim)` at flat slot indices `slots` `(N,)` of open blocks.

        Rows may come from any device (a tier's blocks are read back on the host).
        """
        slots = slots.to(self.k.device)
        self.k.index_copy_(0, slots, key.to(self.k.device, self.dtype))
        self.v.index_copy_(0, slots, value.to(self.k.device, self.dtype))
        if self.key_bounds is not None:
            self.key_bounds.update(slots, key)

    def read(
        self, slots: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(N, head_dim)` in the pool's dtype at flat slot indices `slots` `(N,)`.

        With `out` (two buffers of at least N rows) the result is written into
        their first N rows, valid until the next read into the same buffers.
        """
        k, v = self._read_buffers(slots.numel(), out)
        slots = slots.to(self.k.device)
        torch.index_select(self.k, 0, slots, out=k)
        torch.index_select(self.v, 0, slots, out=v)
        return k, v

    def _read_buffers(
        self, n: int, out: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a read of `n` rows goes: the first rows of `out` if it is large enough, else new tensors."""
        if out is None or out[0].shape[0] < n:
            k = torch.empty(n, self.head_dim, dtype=self.dtype, device=self.k.device)
            return k, torch.empty_like(k)
        return out[0][:n], out[1][:n]

    def read_blocks(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of whole blocks: each `(*block_ids.shape, block_size, head_dim)`."""
        k, v = self.read(block_slots(block_ids, self.block_size).flatten())
        shape = (*block_ids.shape, self.block_size, self.head_dim)
        return k.view(shape), v.view(shape)

    def write_blocks(self, block_ids: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Fill whole open blocks: `key`/`value` are `(*block_ids.shape, block_size, head_dim)`."""
        slots = block_slots(block_ids, self.block_size).flatten()
        self.write(slots, key.reshape(-1, self.head_dim), value.reshape(-1, self.head_dim))

    # ---- checks -----------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the free lists and ref counts disagree."""
        free = torch.tensor([i for ids in self._free_lists() for i in ids], dtype=torch.int64, device=HOST)
        assert free.numel() == free.unique().numel(), "a block is on a free list twice"
        is_free = torch.zeros(self.num_blocks, dtype=torch.bool, device=HOST)
        is_free[free] = True
        assert bool((self.ref_counts[is_free] == 0).all()), "a free block is referenced"
        assert bool((self.ref_counts[~is_free] >= 1).all()), "a used block has no reference"

    def stats(self) -> dict[str, float]:
        """Gauges for metrics: blocks (all, in use, free) and bytes (in use, capacity)."""
        return {
            "pool_blocks": self.num_blocks,
            "pool_blocks_used": self.num_used_blocks,
            "pool_blocks_free": self.num_free_blocks,
            "pool_bytes_used": self.bytes_in_use,
            "pool_bytes_capacity": self.capacity_bytes,
        }


class BlockPool(KVPool):
    """The plain pool: every block open, in the pool's dtype, on one free list."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1 or head_dim < 1:
            raise ValueError(
                f"num_blocks, block_size and head_dim must be >= 1, "
                f"got {num_blocks}, {block_size}, {head_dim}"
            )
        super().__init__(num_blocks, num_blocks, block_size, head_dim, dtype, device)
        # Popping from the end hands out low ids first.
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))

    @classmethod
    def with_capacity(
        cls,
        max_bytes: int,
        block_size: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> BlockPool:
        """A pool of as many whole blocks as fit in `max_bytes` (at least one)."""
        per_block = 2 * block_size * head_dim * dtype.itemsize
        return cls(max(1, max_bytes // per_block), block_size, head_dim, dtype, device)

    @property
    def extent(self) -> str:
        return f"{self.num_blocks} blocks of {self.block_size} tokens"

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> torch.Tensor:
        return self._take(self._free, num_blocks)

    def _free_lists(self) -> tuple[list[int], ...]:
        return (self._free,)

    def _put_back(self, freed: torch.Tensor) -> None:
        self._free.extend(freed.tolist())


def block_slots(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot indices of whole blocks: `(..., n)` block ids give `(..., n * block_size)` slots."""
    return (block_ids[..., None] * block_size + torch.arange(block_size, device=block_ids.device)).flatten(-2)
