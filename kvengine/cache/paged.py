"""Per-sequence block tables over the block pool, per layer and per kv-head.

A sequence's cache is a grid of (layer, kv-head) cells. Each cell has its own
list of blocks (`block_table`) and its own length (`lens`), so after a press
evicts tokens each head holds exactly the blocks it needs. For every cached
token the cell also records the flat pool slot where it lives (`slots`) and
its position in the sequence (`positions`), in cache order; attention reads a
cell by gathering those slots. Cache entry i of a cell lives in the cell's
block i // block_size, at offset i % block_size.

Once a press has evicted tokens, or a sliding-window layer has dropped the
blocks no later query can see (`release_outside_window`), a token's index in
its cell is no longer its position: sliding windows compare `positions`.
Keys are cached after RoPE, so evicting tokens never renumbers the ones that
stay.

Block tables are bookkeeping and live on the host (`pool.HOST`) whatever the
pool's device: the scheduler reads them every step, and the attention context
copies one step's tables to the device once per step (`engine/attention.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvengine.cache.pool import HOST, KVPool, block_slots


def _ceil_div(a: torch.Tensor, b: int) -> torch.Tensor:
    return (a + b - 1) // b


def _shift_left(table: torch.Tensor, n: int, fill: int) -> torch.Tensor:
    """`table` `(H, N)` with its first `n` entries of each row dropped, `fill` at the end."""
    return torch.cat([table[:, n:], torch.full_like(table[:, :n], fill)], dim=1)


def _grow(table: torch.Tensor, min_size: int, fill: int) -> torch.Tensor:
    """`table` with its last dim at least `min_size` (doubling), new entries `fill`."""
    size = table.shape[-1]
    if size >= min_size:
        return table
    new_size = max(min_size, 2 * size)
    grown = torch.full((*table.shape[:-1], new_size), fill, dtype=table.dtype, device=table.device)
    grown[..., :size] = table
    return grown


class SequenceKV:
    """Block tables of one sequence. Created and changed only by `PagedKVCache`."""

    def __init__(self, num_layers: int, num_kv_heads: int) -> None:
        shape = (num_layers, num_kv_heads)
        self.block_table = torch.full((*shape, 4), -1, dtype=torch.int64, device=HOST)  # (L, H, max_blocks)
        self.num_blocks = torch.zeros(shape, dtype=torch.int64, device=HOST)  # (L, H)
        self.lens = torch.zeros(shape, dtype=torch.int64, device=HOST)  # (L, H) cached tokens per cell
        # Slot 0 pads unused entries: always a valid index, masked by `lens`.
        self.slots = torch.zeros((*shape, 16), dtype=torch.int64, device=HOST)  # (L, H, capacity)
        # (L, H, capacity): the position of each token
        self.positions = torch.zeros((*shape, 16), dtype=torch.int64, device=HOST)
        self.next_pos = 0  # position of the next token appended: one past the last one so far

    @property
    def max_len(self) -> int:
        return int(self.lens.max())

    @property
    def is_uniform(self) -> bool:
        """True when every (layer, head) cell holds the same number of tokens."""
        return bool((self.lens == self.lens.flatten()[0]).all())

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots `(H, T)` of one layer's cached tokens, and per-head lengths `(H,)`.

        The lengths are None when all heads of the layer hold `T` tokens; else
        entries of a head past its length are padding to be masked.
        """
        lens = self.lens[layer]
        max_len = int(lens.max())
        slots = self.slots[layer, :, :max_len]
        return slots, (None if bool((lens == max_len).all()) else lens)

    def token_positions(self, layer: int) -> torch.Tensor:
        """Positions `(H, T)` of one layer's cached tokens, aligned with `context(layer)`'s slots."""
        return self.positions[layer, :, : int(self.lens[layer].max())]


class PagedKVCache:
    """Allocates, fills and frees the blocks of sequences in one `KVPool`."""

    def __init__(self, pool: KVPool, num_layers: int, num_kv_heads: int) -> None:
        self.pool = pool
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads

    @property
    def block_size(self) -> int:
        return self.pool.block_size

    def new_sequence(self) -> SequenceKV:
        return SequenceKV(self.num_layers, self.num_kv_heads)

    def blocks_needed(self, seq: SequenceKV, num_tokens: int) -> int:
        """Blocks `append(seq, num_tokens)` would take from the pool."""
        needed = _ceil_div(seq.lens + num_tokens, self.block_size) - seq.num_blocks
        return int(needed.clamp_min(0).sum())

    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a fresh sequence of `num_tokens` tokens takes."""
        cells = self.num_layers * self.num_kv_heads
        return cells * -(-num_tokens // self.block_size)

    def can_append(self, seq: SequenceKV, num_tokens: int) -> bool:
        return self.pool.can_allocate(self.blocks_needed(seq, num_tokens))

    def append(self, seq: SequenceKV, num_tokens: int, start_pos: int | None = None) -> torch.Tensor:
        """Reserve slots for `num_tokens` new tokens in every cell; returns them `(L, H, n)`.

        The tokens are at positions `start_pos, start_pos + 1, ...` (default:
        `seq.next_pos`, right after the last token appended). Raises
        OutOfBlocksError (and changes nothing) when the pool is short.
        """
        start = seq.next_pos if start_pos is None else start_pos
        if start < seq.next_pos:
            raise ValueError(f"new tokens at position {start}, before the sequence's next {seq.next_pos}")
        bs = self.block_size
        new_lens = seq.lens + num_tokens
        new_num_blocks = _ceil_div(new_lens, bs)
        ids = self.pool.allocate(int((new_num_blocks - seq.num_blocks).sum()))
        seq.block_table = _grow(seq.block_table, int(new_num_blocks.max()), -1)
        j = torch.arange(seq.block_table.shape[-1], device=HOST)
        fresh = (j >= seq.num_blocks[..., None]) & (j < new_num_blocks[..., None])
        seq.block_table[fresh] = ids  # row-major order: cell by cell, block by block
        seq.num_blocks = new_num_blocks

        pos = seq.lens[..., None] + torch.arange(num_tokens, device=HOST)  # (L, H, n)
        slots = seq.block_table.gather(2, pos // bs) * bs + pos % bs
        seq.slots = _grow(seq.slots, int(new_lens.max()), 0)
        seq.slots.scatter_(2, pos, slots)
        seq.positions = _grow(seq.positions, int(new_lens.max()), 0)
        seq.positions.scatter_(2, pos, (start + torch.arange(num_tokens, device=HOST)).expand_as(pos))
        seq.lens = new_lens
        seq.next_pos = start + num_tokens
        return slots

    def retain(self, seq: SequenceKV, layer: int, keep: Sequence[torch.Tensor]) -> None:
        """Keep only tokens `keep[h]` (indices into head h's cache, in order) of one layer.

        The kept keys and values move into fresh, densely filled blocks and the
        old blocks are released, so the memory of evicted tokens returns to
        the pool at once. New blocks are taken before old ones are released:
        the pool needs room for the kept tokens of one layer.
        """
        if len(keep) != self.num_kv_heads:
            raise ValueError(f"keep has {len(keep)} entries, expected {self.num_kv_heads} heads")
        bs = self.block_size
        kept_slots, kept_positions = [], []
        for head, idx in enumerate(keep):
            idx = idx.to(HOST)  # a press may answer on the pool's device
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= int(seq.lens[layer, head])):
                raise IndexError(f"keep indices out of range for layer {layer}, head {head}")
            kept_slots.append(seq.slots[layer, head, idx])
            kept_positions.append(seq.positions[layer, head, idx])
        new_lens = torch.tensor([s.numel() for s in kept_slots], dtype=torch.int64, device=HOST)
        new_num_blocks = _ceil_div(new_lens, bs)
        ids = self.pool.allocate(int(new_num_blocks.sum()))

        old_blocks = seq.block_table[layer][seq.block_table[layer] >= 0]
        seq.block_table[layer] = -1
        start = 0
        for head, src in enumerate(kept_slots):
            n_blk = int(new_num_blocks[head])
            blocks = ids[start : start + n_blk]
            start += n_blk
            seq.block_table[layer, head, :n_blk] = blocks
            dst = block_slots(blocks, bs)[: src.numel()]
            k, v = self.pool.read(src)
            self.pool.write(dst, k, v)
            seq.slots[layer, head, : src.numel()] = dst
            seq.positions[layer, head, : src.numel()] = kept_positions[head]
        seq.num_blocks[layer] = new_num_blocks
        seq.lens[layer] = new_lens
        self.pool.release(old_blocks)

    def fork(self, seq: SequenceKV) -> SequenceKV:
        """A new sequence with the same cached tokens; full blocks are shared, not copied.

        Each cell's last block, if partly filled, is copied: both sequences
        will append into it. Shared blocks gain a reference and are freed when
        the last sequence holding them is freed.
        """
        bs = self.block_size
        child = self.new_sequence()
        child.block_table = seq.block_table.clone()
        child.num_blocks = seq.num_blocks.clone()
        child.lens = seq.lens.clone()
        child.slots = seq.slots.clone()
        child.positions = seq.positions.clone()
        child.next_pos = seq.next_pos
        partial = (seq.lens % bs != 0) & (seq.num_blocks > 0)  # (L, H)
        shared = seq.block_table.clone()
        last = (seq.num_blocks - 1).clamp_min(0)[..., None]
        shared.scatter_(2, last, torch.where(partial[..., None], -1, shared.gather(2, last)))
        self.pool.incref(shared[shared >= 0])
        cells = partial.nonzero().tolist()
        if cells:
            fresh = self.pool.allocate(len(cells))
            for (layer, head), block in zip(cells, fresh.tolist(), strict=True):
                n = int(seq.lens[layer, head])
                start = (n // bs) * bs
                src = seq.slots[layer, head, start:n]
                dst = block * bs + torch.arange(n - start, device=HOST)
                self.pool.write(dst, *self.pool.read(src))
                child.block_table[layer, head, int(seq.num_blocks[layer, head]) - 1] = block
                child.slots[layer, head, start:n] = dst
        return child

    def share_blocks(self, block_ids: torch.Tensor) -> SequenceKV:
        """A new sequence whose cache starts with the full blocks `block_ids` `(L, H, n)`.

        Every cell then holds the same `n * block_size` tokens. The blocks are
        shared, not copied: each gains a reference, dropped when the sequence
        is freed. They are full, so the sequence appends into fresh blocks and
        never writes into them.
        """
        if tuple(block_ids.shape[:2]) != (self.num_layers, self.num_kv_heads):
            raise ValueError(f"block ids of shape {tuple(block_ids.shape)} do not match the cache's cells")
        seq = self.new_sequence()
        num_blocks = block_ids.shape[2]
        if num_blocks == 0:
            return seq
        self.pool.incref(block_ids.flatten())
        bs, num_tokens = self.block_size, num_blocks * self.block_size
        seq.block_table = _grow(seq.block_table, num_blocks, -1)
        seq.block_table[..., :num_blocks] = block_ids
        seq.num_blocks.fill_(num_blocks)
        seq.slots = _grow(seq.slots, num_tokens, 0)
        seq.slots[..., :num_tokens] = block_slots(block_ids, bs)
        seq.positions = _grow(seq.positions, num_tokens, 0)
        seq.positions[..., :num_tokens] = torch.arange(num_tokens, device=HOST)
        seq.lens.fill_(num_tokens)
        seq.next_pos = num_tokens
        return seq

    def adopt(
        self, block_table: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor | None = None
    ) -> SequenceKV:
        """A new sequence over blocks the caller allocated and hands over (no new reference).

        `block_table` `(L, H, n)` lists each cell's blocks (-1 past its last);
        `lens` `(L, H)` its cached tokens; `positions` `(L, H, >= max len)`
        their positions (default: 0, 1, ... in every cell, a cache no press
        touched). Used to rebuild a cache read back from storage; the next
        token goes one past the last position held.
        """
        bs = self.block_size
        seq = self.new_sequence()
        seq.block_table = _grow(block_table.clone(), 4, -1)
        seq.num_blocks = (block_table >= 0).sum(-1)
        seq.lens = lens.clone()
        slots = block_slots(block_table.clamp_min(0), bs)  # (L, H, n * bs)
        past = torch.arange(slots.shape[-1], device=HOST) >= lens[..., None]
        slots[past] = 0
        seq.slots = _grow(slots, 16, 0)
        width = slots.shape[-1]
        if positions is None:
            positions = torch.arange(width, device=HOST).expand_as(slots)
        positions = _grow(positions[..., :width].clone(), width, 0)
        positions[past] = 0
        seq.positions = _grow(positions, 16, 0)
        # A press may have evicted the last tokens: the caller's next position may lie beyond.
        seq.next_pos = int(positions.max()) + 1 if int(lens.max()) > 0 else 0
        return seq

    def full_blocks(self, seq: SequenceKV) -> torch.Tensor:
        """Block ids `(L, H, n)` of the first `n` blocks, full in every cell, where block j of
        every cell holds the tokens at positions `[j * block_size, (j + 1) * block_size)`.

        The blocks of a sequence no press has touched; a cell a press or a
        window changed ends the run where its tokens leave that order.
        """
        num_blocks = int(seq.lens.min()) // self.block_size
        head = seq.positions[..., : num_blocks * self.block_size]
        in_order = (head == torch.arange(head.shape[-1], device=HOST)).all(dim=(0, 1))  # (n * bs,)
        num_blocks = int(in_order.view(num_blocks, self.block_size).all(-1).int().cumprod(0).sum())
        return seq.block_table[..., :num_blocks].clone()

    def release_outside_window(self, seq: SequenceKV, layer: int, window: int) -> int:
        """Release the leading blocks of one layer that no later query can see; returns how many.

        A query at position p of a sliding-window layer sees keys at positions
        > p - window, and later queries are at `seq.next_pos` or beyond: a
        token at a position <= `seq.next_pos - window` is never read again.
        The leading full blocks that hold only such tokens in every head of
        the layer go (the same number per head, so heads that held equally
        many tokens still do); the rest move to the front of each cell. Not
        for a sequence whose blocks are shared later in full (the prefix
        cache's): its blocks for those tokens are gone.
        """
        bs = self.block_size
        num_full = int(seq.lens[layer].min()) // bs
        if num_full == 0:
            return 0
        old = seq.positions[layer, :, : num_full * bs].reshape(-1, num_full, bs)  # (H, n, bs)
        unseen = (old <= seq.next_pos - window).all(-1).all(0)  # (n,) blocks no query sees, every head
        num_blocks = int(unseen.int().cumprod(0).sum())
        if num_blocks == 0:
            return 0
        dropped = seq.block_table[layer, :, :num_blocks].flatten().clone()  # the table changes below
        shift = num_blocks * bs
        seq.block_table[layer] = _shift_left(seq.block_table[layer], num_blocks, -1)
        seq.slots[layer] = _shift_left(seq.slots[layer], shift, 0)
        seq.positions[layer] = _shift_left(seq.positions[layer], shift, 0)
        seq.num_blocks[layer] -= num_blocks
        seq.lens[layer] -= shift
        self.pool.release(dropped)
        return int(dropped.numel())

    def free(self, seq: SequenceKV) -> None:
        """Release every block of `seq`; the sequence is left empty."""
        self.pool.release(seq.block_table[seq.block_table >= 0])
        seq.block_table.fill_(-1)
        seq.num_blocks.zero_()
        seq.lens.zero_()
        seq.next_pos = 0

    def bytes_held(self, seq: SequenceKV) -> int:
        """Bytes of the blocks `seq` references (shared blocks counted in full)."""
        return self.pool.bytes_of(seq.block_table[seq.block_table >= 0])

    def seal_full_blocks(self, seq: SequenceKV) -> int:
        """Seal every full, still open block of `seq` (a pool that seals only); returns how many.

        A cell's last block stays open until it is full: that is KIVI's
        full-precision residual. Blocks shared with another sequence stay
        open (sealing moves a block, and a shared block cannot move).
        """
        if not self.pool.seals_blocks:
            return 0
        j = torch.arange(seq.block_table.shape[-1], device=HOST)
        full = j < (seq.lens // self.block_size)[..., None]
        candidates = seq.block_table.clamp_min(0)
        mask = full & ~self.pool.is_sealed(candidates) & (self.pool.ref_counts[candidates] == 1)
        ids = seq.block_table[mask]
        if ids.numel() == 0:
            return 0
        seq.block_table[mask] = self.pool.seal(ids)
        # Tokens keep their offsets inside a block; only block ids changed.
        pos = torch.arange(seq.slots.shape[-1], device=HOST)
        blocks = seq.block_table.gather(
            2, (pos // self.block_size).clamp_max(seq.block_table.shape[-1] - 1).expand(*seq.lens.shape, -1)
        )
        in_cache = pos < seq.lens[..., None]
        seq.slots = torch.where(in_cache, blocks.clamp_min(0) * self.block_size + pos % self.block_size, 0)
        return ids.numel()
