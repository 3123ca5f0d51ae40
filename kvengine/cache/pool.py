"""The block pool: the one owner of all key/value memory.

The pool is two flat tensors of slots, `k` and `v`, each `(num_blocks *
block_size, head_dim)`. A block is `block_size` consecutive slots and holds
tokens of exactly one (layer, kv-head); which block belongs to which sequence,
layer and head is the business of `paged.py`, not of the pool. Keeping blocks
per kv-head is what lets a press free memory head by head: a head that keeps
fewer tokens holds fewer blocks.

The pool knows nothing about models, sequences or attention. It hands out
block ids, counts references to them, and reports the bytes that blocks in use
really hold.
"""

from __future__ import annotations

import torch

from kvengine.errors import OutOfBlocksError


class BlockPool:
    """Fixed-size blocks of key/value slots with reference counts and a free list.

    Invariants (checked by `check_invariants`): every block is either free
    (ref count 0, on the free list exactly once) or in use (ref count >= 1,
    not on the free list).
    """

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
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.head_dim = head_dim
        self.dtype = dtype
        # torch.empty: pages are only touched when a block is written.
        self.k = torch.empty(num_blocks * block_size, head_dim, dtype=dtype, device=device)
        self.v = torch.empty(num_blocks * block_size, head_dim, dtype=dtype, device=device)
        self.ref_counts = torch.zeros(num_blocks, dtype=torch.int32)
        # Stack of free ids; popping from the end hands out low ids first.
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
        per_block = 2 * block_size * head_dim * torch.empty((), dtype=dtype).element_size()
        return cls(max(1, max_bytes // per_block), block_size, head_dim, dtype, device)

    # ---- accounting -------------------------------------------------------

    @property
    def bytes_per_block(self) -> int:
        """Bytes of keys plus values one block holds."""
        return 2 * self.block_size * self.head_dim * self.k.element_size()

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

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

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> torch.Tensor:
        """Take `num_blocks` free blocks, each with ref count 1; returns their ids (int64)."""
        if num_blocks > len(self._free):
            raise OutOfBlocksError(
                f"the KV pool has {len(self._free)} free blocks, {num_blocks} were asked for "
                f"(pool: {self.num_blocks} blocks of {self.block_size} tokens)"
            )
        if num_blocks == 0:
            return torch.empty(0, dtype=torch.int64)
        taken = self._free[-num_blocks:]
        del self._free[-num_blocks:]
        ids = torch.tensor(taken, dtype=torch.int64)
        self.ref_counts[ids] = 1
        return ids

    def incref(self, block_ids: torch.Tensor) -> None:
        """Add one reference to each block in use (sharing, e.g. by a prefix cache)."""
        add_refs(self.ref_counts, block_ids)

    def release(self, block_ids: torch.Tensor) -> None:
        """Drop one reference to each block; blocks whose count reaches 0 are freed."""
        self._free.extend(drop_refs(self.ref_counts, block_ids).tolist())

    # ---- data -------------------------------------------------------------

    def write(self, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store `key`/`value` rows `(N, head_dim)` at flat slot indices `slots` `(N,)`."""
        self.k.index_copy_(0, slots, key.to(self.dtype))
        self.v.index_copy_(0, slots, value.to(self.dtype))

    def read(
        self, slots: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `(N, head_dim)` at flat slot indices `slots` `(N,)`.

        With `out` (two buffers of at least N rows) the result is written into
        their first N rows, valid until the next read into the same buffers.
        """
        n = slots.numel()
        if out is None or out[0].shape[0] < n:
            return self.k.index_select(0, slots), self.v.index_select(0, slots)
        k, v = out[0][:n], out[1][:n]
        torch.index_select(self.k, 0, slots, out=k)
        torch.index_select(self.v, 0, slots, out=v)
        return k, v

    def read_blocks(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of the keys and values of whole blocks: each `(*block_ids.shape, block_size, head_dim)`."""
        k, v = self.read(block_slots(block_ids, self.block_size).flatten())
        shape = (*block_ids.shape, self.block_size, self.head_dim)
        return k.view(shape), v.view(shape)

    def write_blocks(self, block_ids: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Fill whole blocks: `key`/`value` are `(*block_ids.shape, block_size, head_dim)`."""
        slots = block_slots(block_ids, self.block_size).flatten()
        self.write(slots, key.reshape(-1, self.head_dim), value.reshape(-1, self.head_dim))

    # ---- checks -----------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the free list and ref counts disagree."""
        free = torch.tensor(self._free, dtype=torch.int64)
        assert free.numel() == free.unique().numel(), "a block is on the free list twice"
        is_free = torch.zeros(self.num_blocks, dtype=torch.bool)
        is_free[free] = True
        assert bool((self.ref_counts[is_free] == 0).all()), "a free block is referenced"
        assert bool((self.ref_counts[~is_free] >= 1).all()), "a used block has no reference"


def block_slots(block_ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat slot indices of whole blocks: `(..., n)` block ids give `(..., n * block_size)` slots."""
    return (block_ids[..., None] * block_size + torch.arange(block_size)).flatten(-2)


def add_refs(ref_counts: torch.Tensor, block_ids: torch.Tensor) -> None:
    """One more reference to each of `block_ids` (a block listed twice gets two); all must be in use."""
    if bool((ref_counts[block_ids] < 1).any()):
        raise ValueError("incref on a free block")
    ref_counts.index_add_(0, block_ids, torch.ones_like(block_ids, dtype=torch.int32))


def drop_refs(ref_counts: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """One reference less to each of `block_ids`; returns the ids whose count reached 0."""
    if block_ids.numel() == 0:
        return block_ids
    if bool((ref_counts[block_ids] < 1).any()):
        raise ValueError("release of a block that is already free")
    ref_counts.index_add_(0, block_ids, torch.full_like(block_ids, -1, dtype=torch.int32))
    return block_ids[ref_counts[block_ids] == 0].unique()
