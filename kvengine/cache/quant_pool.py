"""A block pool whose full blocks are stored packed to 2, 3, 4 or 8 bits (KIVI, optionally rotated).

A `KVPool` (see `pool.py` for the contract) next to the plain `BlockPool`:
same slot numbering (slot = block id * block_size + offset), same
allocation, ref counts, `write` and `read`. What differs is that a block is
in one of two states:

- OPEN: full precision in the pool's dtype, being filled. `allocate` hands out
  open blocks and `write` goes only into open blocks. The most recent tokens
  of a (layer, kv-head), fewer than a block, always sit in an open block:
  this is KIVI's full-precision residual.
- SEALED: packed (see `quant.py`). `seal` quantizes full open blocks into new
  packed blocks, frees the open ones and returns the packed ids. A sealed block
  is never written or quantized again, so appending tokens never changes what
  is already stored.

A block may also be PINNED (`pin`): an open block that `seal` leaves open,
in full precision, until it is freed. Demotion (`cache/demote.py`) pins the
blocks of a head's important tokens and seals the rest: mixed precision in
one block table, with no third kind of storage.

Open and packed blocks live in separate tensors, so sealing really returns
full-precision memory. Ids `[0, num_open_blocks)` are open blocks, ids
`[num_open_blocks, num_blocks)` packed ones, so one block table holds either
and a slot tells which storage it lives in.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from kvengine.cache.pool import HOST, KVPool
from kvengine.cache.quant import KIVILayout, PackedBlocks
from kvengine.errors import InvalidRequestError


class QuantizedBlockPool(KVPool):
    """Open (full-precision) and sealed (packed) blocks with ref counts and free lists.

    Invariants (checked by `check_invariants`): every block, open or packed,
    is either free (ref count 0, on its kind's free list exactly once) or in
    use (ref count >= 1, on no free list).
    """

    seals_blocks: ClassVar[bool] = True
    label: ClassVar[str] = "quantized KV pool"

    def __init__(
        self,
        num_open_blocks: int,
        num_packed_blocks: int,
        block_size: int,
        head_dim: int,
        bits: int = 2,
        value_group_size: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        key_groups: str = "channel",
        rotate: bool = False,
    ) -> None:
        if num_open_blocks < 1 or num_packed_blocks < 1:
            raise InvalidRequestError(
                f"num_open_blocks and num_packed_blocks must be >= 1, got {num_open_blocks}, {num_packed_blocks}"
            )
        if not dtype.is_floating_point:
            raise InvalidRequestError(f"the pool's dtype must be a floating point type, got {dtype}")
        self.layout = KIVILayout(block_size, head_dim, bits, value_group_size, key_groups, rotate)
        num_blocks = num_open_blocks + num_packed_blocks
        super().__init__(num_blocks, num_open_blocks, block_size, head_dim, dtype, device)
        self.num_packed_blocks = num_packed_blocks
        self.bits = bits
        self.packed: PackedBlocks = self.layout.empty(num_packed_blocks, device)
        self.pinned = torch.zeros(num_blocks, dtype=torch.bool, device=HOST)  # open blocks `seal` leaves open
        self._decoded: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # see keep_decoded
        # Popping from the end hands out low ids first.
        self._free_open: list[int] = list(range(num_open_blocks - 1, -1, -1))
        self._free_packed: list[int] = list(range(num_blocks - 1, num_open_blocks - 1, -1))

    # ---- accounting -------------------------------------------------------

    @property
    def extent(self) -> str:
        return f"{self.num_open_blocks} open and {self.num_packed_blocks} packed blocks of {self.block_size} tokens"

    @property
    def open_bytes_per_block(self) -> int:
        """Bytes of keys plus values one open (full-precision) block holds."""
        return self.bytes_per_block

    @property
    def packed_bytes_per_block(self) -> int:
        """Bytes one sealed block holds: packed codes plus float16 scales and zero points."""
        return self.layout.packed_bytes

    @property
    def num_free_open_blocks(self) -> int:
        return len(self._free_open)

    @property
    def num_free_packed_blocks(self) -> int:
        return len(self._free_packed)

    @property
    def num_used_open_blocks(self) -> int:
        return self.num_open_blocks - len(self._free_open)

    @property
    def num_used_packed_blocks(self) -> int:
        return self.num_packed_blocks - len(self._free_packed)

    @property
    def bytes_in_use(self) -> int:
        """Bytes held by blocks in use: open ones in full precision, sealed ones packed."""
        return (
            self.num_used_open_blocks * self.open_bytes_per_block
            + self.num_used_packed_blocks * self.packed_bytes_per_block
        )

    @property
    def capacity_bytes(self) -> int:
        return (
            self.num_open_blocks * self.open_bytes_per_block
            + self.num_packed_blocks * self.packed_bytes_per_block
        )

    def bytes_of(self, block_ids: torch.Tensor) -> int:
        """Bytes the blocks `block_ids` hold, each counted by its kind (repeats counted again)."""
        num_open = int((block_ids < self.num_open_blocks).sum())
        num_packed = block_ids.numel() - num_open
        return num_open * self.open_bytes_per_block + num_packed * self.packed_bytes_per_block

    # ---- allocation -------------------------------------------------------

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_open)

    def allocate(self, num_blocks: int) -> torch.Tensor:
        return self._take(self._free_open, num_blocks, "open ")

    def can_seal(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_packed)

    def _free_lists(self) -> tuple[list[int], ...]:
        return (self._free_open, self._free_packed)

    def _put_back(self, freed: torch.Tensor) -> None:
        self.pinned[freed] = False
        sealed = self.is_sealed(freed)
        self._free_open.extend(freed[~sealed].tolist())
        self._free_packed.extend(freed[sealed].tolist())

    # ---- sealing ----------------------------------------------------------

    def pin(self, block_ids: torch.Tensor) -> None:
        """Keep open blocks in use open: `seal` returns them unchanged until they are freed."""
        if bool(self.is_sealed(block_ids).any()) or bool((self.ref_counts[block_ids] < 1).any()):
            raise ValueError("pin of a block that is sealed or free (only open blocks in use stay open)")
        self.pinned[block_ids] = True

    @property
    def num_pinned_blocks(self) -> int:
        return int(self.pinned.sum())

    def seal(self, block_ids: torch.Tensor) -> torch.Tensor:
        """Quantize full open blocks into packed blocks; returns the packed ids, in order.

        Each block must be open, distinct, and held by exactly one reference
        (the caller's, which moves to the packed block: others holding the open
        id would be left pointing at a freed block). Every slot of each block
        must have been written. The open blocks are freed. Pinned blocks are
        left as they are (their ids are returned unchanged). Raises
        OutOfBlocksError (and changes nothing) when too few packed blocks are free.
        """
        if block_ids.numel() == 0:
            return torch.empty(0, dtype=torch.int64, device=HOST)
        pinned = self.pinned[block_ids.clamp(0, self.num_blocks - 1)] & (block_ids >= 0)
        if bool(pinned.any()):
            out = block_ids.clone()
            out[~pinned] = self.seal(block_ids[~pinned])
            return out
        if bool(self.is_sealed(block_ids).any()) or bool((block_ids < 0).any()):
            raise ValueError("seal of a block that is not open (sealed blocks are never re-quantized)")
        if block_ids.unique().numel() != block_ids.numel():
            raise ValueError("seal got the same block twice")
        if bool((self.ref_counts[block_ids] != 1).any()):
            raise ValueError(
                "seal needs blocks held by exactly one reference (free or shared blocks cannot be sealed)"
            )
        new_ids = self._take(self._free_packed, block_ids.numel(), "packed ")
        k, v = self.read_blocks(block_ids.flatten())  # (N, block_size, D)
        packed = self.layout.quantize_blocks(k, v)
        dst = (new_ids - self.num_open_blocks).to(self.k.device)
        for store, fresh in zip(self.packed, packed, strict=True):
            store.index_copy_(0, dst, fresh)
        if self._decoded is not None:
            self._decoded[2][dst] = False  # a reused packed id holds new codes
        self.release(block_ids)
        return new_ids

    # ---- data -------------------------------------------------------------

    def write(self, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store rows at slots of open blocks, as `KVPool.write`; sealed blocks are read-only."""
        if slots.numel() and int(slots.max()) >= self._open_slots:
            block = int(slots.max()) // self.block_size
            raise ValueError(f"write into sealed block {block}: packed blocks are read-only")
        super().write(slots, key, value)

    def read(
        self, slots: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at `slots`, as `KVPool.read`; slots may mix open and sealed blocks.

        Each sealed block touched is dequantized once.
        """
        slots = slots.to(self.k.device)
        # The zero slot lies past the packed range; its row of zeros is the open store's last.
        is_zero = slots == self.zero_slot
        sealed = (slots >= self._open_slots) & ~is_zero
        slots = torch.where(is_zero, self._open_slots, slots)
        if not bool(sealed.any()):
            return super().read(slots, out)
        k, v = self._read_buffers(slots.numel(), out)
        at_open = (~sealed).nonzero().squeeze(1)
        k.index_copy_(0, at_open, self.k.index_select(0, slots[at_open]))
        v.index_copy_(0, at_open, self.v.index_select(0, slots[at_open]))

        at_sealed = sealed.nonzero().squeeze(1)
        rel = slots[at_sealed] - self._open_slots  # slot within the packed range
        if self._decoded is not None:
            dk, dv = self._decoded_rows(rel)
            k.index_copy_(0, at_sealed, dk)
            v.index_copy_(0, at_sealed, dv)
            return k, v
        blocks, which = (rel // self.block_size).unique(return_inverse=True)
        touched = PackedBlocks(*(t.index_select(0, blocks) for t in self.packed))
        dk, dv = self.layout.dequantize_blocks(touched, self.dtype)  # (U, block_size, D)
        rows = which * self.block_size + rel % self.block_size
        k.index_copy_(0, at_sealed, dk.flatten(0, 1).index_select(0, rows))
        v.index_copy_(0, at_sealed, dv.flatten(0, 1).index_select(0, rows))
        return k, v

    def keep_decoded(self) -> None:
        """From now on, keep every packed block's dequantized rows after its first read (opt-in).

        Reads then dequantize each sealed block once instead of on every read:
        the same values (the same function of the same codes), at the memory
        of a full-precision copy of the packed capacity, which this pool does
        not count as held (it is a reader's cache, not storage; an evaluation's
        speed-up, not a serving mode).
        """
        if self._decoded is None:
            shape = (self.num_packed_blocks * self.block_size, self.head_dim)
            self._decoded = (
                torch.empty(shape, dtype=self.dtype, device=self.k.device),
                torch.empty(shape, dtype=self.dtype, device=self.k.device),
                torch.zeros(self.num_packed_blocks, dtype=torch.bool, device=self.k.device),
            )

    def _decoded_rows(self, rel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at packed-range slots `rel`, dequantizing the blocks not decoded yet."""
        assert self._decoded is not None
        dk_all, dv_all, done = self._decoded
        block_of = rel // self.block_size
        missing = ~done[block_of]
        if bool(missing.any()):
            blocks = block_of[missing].unique()
            touched = PackedBlocks(*(t.index_select(0, blocks) for t in self.packed))
            dk, dv = self.layout.dequantize_blocks(touched, self.dtype)  # (U, block_size, D)
            rows = (
                blocks[:, None] * self.block_size + torch.arange(self.block_size, device=blocks.device)
            ).flatten()
            dk_all.index_copy_(0, rows, dk.flatten(0, 1))
            dv_all.index_copy_(0, rows, dv.flatten(0, 1))
            done[blocks] = True
        return dk_all.index_select(0, rel), dv_all.index_select(0, rel)

    # ---- checks -----------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise AssertionError if the free lists and ref counts disagree, or a block is on the wrong list."""
        super().check_invariants()
        open_free = torch.tensor(self._free_open, dtype=torch.int64, device=HOST)
        assert not bool(self.is_sealed(open_free).any()), "a packed block is on the open free list"
        packed_free = torch.tensor(self._free_packed, dtype=torch.int64, device=HOST)
        assert bool(self.is_sealed(packed_free).all()), "an open block is on the packed free list"
        assert not bool(self.pinned[open_free].any()), "a free block is pinned"
        assert not bool(self.is_sealed(self.pinned.nonzero().squeeze(1)).any()), "a sealed block is pinned"
