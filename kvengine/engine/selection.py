"""Query-aware block selection while decoding (Quest, Tang et al. 2024, arXiv:2406.10774).

Every decode step, each (sequence, kv-head) cell attends only to some of its
blocks: its first `sink_blocks` (attention sinks), its last `recent_blocks`
(the one holding the new token among them) and, of the others, those whose
upper-bound score for this step's queries is highest, up to `budget` blocks
in all (or `fraction` of the cell's blocks). The score of a block is
`sum_d max(q_d * min_d, q_d * max_d)` over the per-channel key bounds the
pool keeps per block (`kvengine.cache.key_bounds`); it bounds `q . k` for
every key of the block. Query heads of one kv-head share its selection,
ranked by one of two scores (`heads`):

- "sum" (the default): the heads' bounds summed (Quest's score for a shared
  kv-head).
- "max": each query head's bound minus that head's best bound over the
  cell's blocks, the largest over the heads: a block that a single head
  looks at ranks high even when the kv-head's other heads look elsewhere.
- "mass": each query head's bounds, at the attention's scale 1/sqrt(D), as
  a softmax over the cell's blocks (the share of that head's attention the
  bounds allow each block), those shares summed over the heads: a block a
  peaked head puts its weight on is kept even when the others look
  elsewhere (the sum's failure), but a diffuse head's favourite counts for
  little (the failure of "max", where every head's best block counts alike).

and, with `neighbours` (default 0), each sink and each block taken for its
score brings the blocks after it, within the same budget: the words a
query matches ("the code of the boiler room is") are often in the block
before the value it needs (the digits). On SmolLM2 and `needle_hard` at
4k (40 examples, 14% of the blocks read, docs/benchmarks.md) every
setting ("sum", "max", "mass", two dense layers) finds 73-82% of what full
attention finds, with overlapping intervals, and they lose mostly the
same examples: no ranking is a clear win, so the defaults stay Quest's.

Nothing is evicted: the whole cache stays in the pool, and another step (or
another question) may select other blocks. Selection only builds a smaller
slot table per (layer, cell) for the same attention (`select_blocks`); the
decode kernel (`kernel.py`) already reads ragged per-head slot lists, so the
chosen blocks are read in place, never gathered. On a CPU the ranking and
the new tables are one C++ op per layer (`select_kernel.py`); elsewhere, or
without a compiler, the same selection runs as batched torch ops.

This module decides which blocks are read; it does not read them, and it
does not keep the bounds up to date (the pool does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from kvengine.cache.key_bounds import KeyBounds
from kvengine.engine.select_kernel import select_op
from kvengine.errors import InvalidRequestError

HEAD_SCORES = ("sum", "max", "mass")  # how a kv-head's query heads rank its blocks (BlockSelection.heads)


@dataclass(frozen=True)
class BlockSelection:
    """How many blocks each cell reads per decode step: `budget` blocks or `fraction` of its blocks.

    Give one of `budget` (blocks, sinks and recent ones included) and
    `fraction` (of a cell's blocks, rounded up; never below what the sinks
    and recent blocks need). The first `dense_layers` layers read every block
    (Quest leaves the first two layers dense, where attention is spread out).
    `heads` ranks blocks by the heads' bounds summed ("sum"), by each query
    head's relative bound, the best head deciding ("max"), or by the heads'
    softmax shares of the bounds summed ("mass"). Each sink and each
    block taken for its score brings its next `neighbours` blocks, within the
    same budget (a needle's value often sits in the block after the words a
    query matches).
    """

    budget: int = 0
    fraction: float = 0.0
    sink_blocks: int = 1
    recent_blocks: int = 2
    dense_layers: int = 0
    heads: str = "sum"
    neighbours: int = 0

    def __post_init__(self) -> None:
        if self.heads not in HEAD_SCORES:
            raise InvalidRequestError(
                f"block selection: heads must be one of {', '.join(map(repr, HEAD_SCORES))}, got {self.heads!r}"
            )
        for name in ("budget", "sink_blocks", "recent_blocks", "dense_layers", "neighbours"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"block selection: {name} must be an integer >= 0, got {value!r}")
        if self.recent_blocks < 1:
            raise InvalidRequestError(
                "block selection: recent_blocks must be >= 1 (the block of the new token)"
            )
        if (self.budget > 0) == (self.fraction > 0):
            raise InvalidRequestError(
                f"block selection: give one of budget (blocks) or fraction, got budget={self.budget}, "
                f"fraction={self.fraction}"
            )
        if not 0.0 <= self.fraction <= 1.0:
            raise InvalidRequestError(f"block selection: fraction must be in (0, 1], got {self.fraction}")
        if self.budget and self.budget < self.reserved_blocks:
            raise InvalidRequestError(
                f"block selection: a budget of {self.budget} blocks is below the {self.reserved_blocks} "
                f"that {self.sink_blocks} sink and {self.recent_blocks} recent blocks need"
            )

    @property
    def reserved_blocks(self) -> int:
        """Blocks every cell reads whatever the scores: sinks and recent blocks."""
        return self.sink_blocks + self.recent_blocks

    def blocks_to_read(self, num_blocks: int) -> int:
        """Blocks a cell of `num_blocks` blocks reads per step (all of them if that many or fewer)."""
        k = self.budget if self.budget else math.ceil(self.fraction * num_blocks)
        return min(num_blocks, max(k, self.reserved_blocks))


@dataclass
class SelectionStats:
    """Blocks read and blocks held over the decode steps of a run, summed over layers and cells.

    Kept as tensors so that a layer adds to them without a host sync.
    """

    blocks_read: torch.Tensor = field(
        default_factory=lambda: torch.zeros((), dtype=torch.int64, device="cpu")
    )
    blocks_held: torch.Tensor = field(
        default_factory=lambda: torch.zeros((), dtype=torch.int64, device="cpu")
    )

    def add(self, read: torch.Tensor, held: torch.Tensor) -> None:
        self.blocks_read += read
        self.blocks_held += held

    @property
    def read_fraction(self) -> float:
        """Blocks read per step over blocks the cache holds (1.0 before any step)."""
        held = int(self.blocks_held)
        return int(self.blocks_read) / held if held else 1.0


def dense_selection(
    slots: torch.Tensor, lens: torch.Tensor, positions: torch.Tensor | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """What `select_blocks` returns for a layer that reads every block (a dense layer)."""
    held = (-(-lens // block_size)).sum()
    return slots, lens, positions, held, held


def select_blocks(
    selection: BlockSelection,
    bounds: KeyBounds,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    zero_slot: int,
    positions: torch.Tensor | None = None,
    use_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The slot table of the selected blocks of N decoding cells, for one layer.

    q `(N, H_q, D)` this step's queries; slots `(N, H_kv, T)` each cell's
    cached tokens in cache order (zero slot past its length), lens
    `(N, H_kv)`, positions `(N, H_kv, T)` or None. Returns (slots, lens,
    positions) of the selected blocks in cache order (zero slot past the new
    lengths), the blocks read and the blocks held (scalar tensors). Among the
    blocks that are not sinks or recent, ties between equal bounds go to the
    earlier block.

    One call of the C++ op (`select_kernel.py`) on a CPU where it builds and
    `use_kernel`; torch ops over the whole batch at once otherwise. Neither
    syncs with the host.
    """
    bs = bounds.block_size
    width = slots.shape[-1]
    num_blocks = -(-width // bs)
    k = selection.blocks_to_read(num_blocks)
    if k >= num_blocks:
        return dense_selection(slots, lens, positions, bs)
    op = select_op() if use_kernel and slots.device.type == "cpu" else None
    if op is None:
        return _select_with_torch(selection, bounds, q, slots, lens, zero_slot, positions, k)
    new_slots, new_lens, new_positions, counts = op(
        q, bounds.min, bounds.max, slots, lens, positions, bs, k,
        selection.sink_blocks, selection.recent_blocks, zero_slot, HEAD_SCORES.index(selection.heads),
        selection.neighbours, q.shape[-1] ** -0.5,
    )  # fmt: skip
    return new_slots, new_lens, new_positions if positions is not None else None, counts[0], counts[1]


def _select_with_torch(
    selection: BlockSelection,
    bounds: KeyBounds,
    q: torch.Tensor,
    slots: torch.Tensor,
    lens: torch.Tensor,
    zero_slot: int,
    positions: torch.Tensor | None,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """`select_blocks` as torch ops over every cell of the batch at once (`k` blocks per cell)."""
    bs = bounds.block_size
    n, num_kv_heads, width = slots.shape
    num_blocks = -(-width // bs)
    cell_blocks = -(-lens // bs)  # (N, H_kv)
    pad = num_blocks * bs - width
    blocked = F.pad(slots, (0, pad), value=zero_slot).view(n, num_kv_heads, num_blocks, bs)
    block_ids = blocked[..., 0] // bs  # (N, H_kv, B); padding maps to the bounds' zero row
    qg = q.view(n, num_kv_heads, q.shape[1] // num_kv_heads, q.shape[-1])
    j = torch.arange(num_blocks, device=slots.device)
    valid = j < cell_blocks[..., None]
    if selection.heads == "sum":
        scores = bounds.group_upper_bound(qg, block_ids).nan_to_num(float("-inf"))  # (N, H_kv, B)
    else:
        scores = _per_head_scores(bounds, qg, block_ids, valid, selection.heads)
    forced = (j < selection.sink_blocks) | (j >= cell_blocks[..., None] - selection.recent_blocks)
    # Ties go to the earlier block, as in the kernel: a stable sort, not topk.
    if selection.neighbours:
        chosen = _chosen_with_neighbours(scores, forced & valid, cell_blocks, k, selection)
    else:
        scores = scores.masked_fill(forced, float("inf")).masked_fill(~valid, float("-inf"))
        chosen = (
            scores.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(dim=-1).values
        )  # (N, H_kv, k)
    # Only a cell's last block may be partly filled, and it is always chosen, and last: the chosen
    # blocks' tokens form a prefix of the new table.
    counts = (lens[..., None] - chosen * bs).clamp(0, bs)  # (N, H_kv, k)
    new_lens = counts.sum(-1)
    index = chosen[..., None].expand(-1, -1, -1, bs)
    new_slots = blocked.gather(2, index).flatten(2)
    new_slots.masked_fill_(torch.arange(k * bs, device=slots.device) >= new_lens[..., None], zero_slot)
    new_positions = None
    if positions is not None:
        blocked_pos = F.pad(positions, (0, pad)).view(n, num_kv_heads, num_blocks, bs)
        new_positions = blocked_pos.gather(2, index).flatten(2)
        new_positions.masked_fill_(torch.arange(k * bs, device=slots.device) >= new_lens[..., None], 0)
    return new_slots, new_lens, new_positions, (counts > 0).sum(), cell_blocks.sum()


def _per_head_scores(
    bounds: KeyBounds, qg: torch.Tensor, block_ids: torch.Tensor, valid: torch.Tensor, heads: str
) -> torch.Tensor:
    """Scores of `heads="max"` or `"mass"` from each query head's bounds.

    "max": per query head, its bound minus its best over the cell's blocks;
    max over heads. "mass": per query head, the softmax of its bounds times
    1/sqrt(D) over the cell's blocks; summed over heads. qg `(N, H_kv, G,
    D)`, block_ids and valid `(N, H_kv, B)` -> `(N, H_kv, B)`; blocks past a
    cell's end, and blocks no head has a finite bound for, score -inf.
    """
    n, num_heads, num_blocks = block_ids.shape
    rows = block_ids.to(bounds.min.device).reshape(-1)
    lo = bounds.min.index_select(0, rows).view(n * num_heads, num_blocks, -1).float()  # (N*H, B, D)
    hi = bounds.max.index_select(0, rows).view(n * num_heads, num_blocks, -1).float()
    qf = qg.float().reshape(n * num_heads, qg.shape[2], -1)  # (N*H, G, D)
    per = torch.baddbmm(qf.clamp_min(0) @ hi.transpose(1, 2), qf.clamp_max(0), lo.transpose(1, 2))
    per = per.view(n, num_heads, -1, num_blocks)  # (N, H, G, B)
    none = ~torch.isfinite(per) | ~valid[:, :, None, :]
    per = per.masked_fill(none, float("-inf"))
    best = per.amax(-1, keepdim=True)
    best = best.masked_fill(best == float("-inf"), 0.0)  # a head without a finite bound: its blocks stay -inf
    if heads == "max":
        return (per - best).masked_fill(none, float("-inf")).amax(2)
    share = ((per - best) * qg.shape[-1] ** -0.5).exp()  # exp(-inf) = 0 where a head has no bound
    share = share / share.sum(-1, keepdim=True).clamp_min(torch.finfo(share.dtype).tiny)
    return share.sum(2).masked_fill(none.all(2), float("-inf"))


def _chosen_with_neighbours(
    scores: torch.Tensor, forced: torch.Tensor, cell_blocks: torch.Tensor, k: int, selection: BlockSelection
) -> torch.Tensor:
    """The `k` block indices `(N, H_kv, k)` each cell reads, ascending, when picks bring their successors.

    Forced blocks first; then each sink's and each best-scored block's run of
    `1 + neighbours` blocks in that order, skipping blocks already taken or
    past the cell's end, until the cell has `k` (as the kernel's `pick`).
    """
    n, num_heads, num_blocks = scores.shape
    device, span = scores.device, selection.neighbours + 1
    order = scores.masked_fill(forced, float("-inf")).sort(dim=-1, descending=True, stable=True).indices
    sinks = torch.arange(min(selection.sink_blocks, num_blocks), device=device).expand(n, num_heads, -1)
    starts = torch.cat([sinks, order], dim=-1)
    cand = (starts[..., None] + torch.arange(span, device=device)).flatten(2)  # (N, H, S * span)
    where = torch.arange(cand.shape[-1], device=device).expand_as(cand)
    first = torch.full((n, num_heads, num_blocks + span), cand.shape[-1], dtype=torch.long, device=device)
    first.scatter_reduce_(-1, cand, where, "amin")  # each block's first place among the candidates
    wide_forced = F.pad(forced, (0, span))
    ok = (cand < cell_blocks[..., None]) & ~wide_forced.gather(-1, cand) & (first.gather(-1, cand) == where)
    room = k - forced.sum(-1, keepdim=True)
    take = ok & (ok.cumsum(-1) <= room)
    mask = torch.zeros(n, num_heads, num_blocks + span, dtype=torch.long, device=device)
    mask.scatter_add_(-1, cand, take.long())
    mask = (mask[..., :num_blocks] > 0) | forced
    # Chosen blocks first, in cache order: cells shorter than k blocks are followed by blocks past their end.
    return mask.long().sort(dim=-1, descending=True, stable=True).indices[..., :k]
