"""Attention over the paged KV cache: kvengine's one seam with transformers.

`paged_attention` is registered with `transformers.AttentionInterface` under
the name "kvengine". A model whose config selects that implementation calls
it from its own attention modules with this step's queries, keys and values
(after RoPE). It writes the new keys and values into the block pool at the
slots the runner reserved, then attends each sequence's queries over that
sequence's cached tokens, read back from the pool.

What the function needs besides its arguments (the pool, which slots are new,
which tokens of the packed batch belong to which sequence) comes from a
`ForwardContext`, set by the runner with `forward_context(...)` around one
model forward; the context manager refuses nesting, and the attention function
refuses to run outside it.

Many sequences share one forward pass as a packed batch: the model sees one
row of `T` tokens (batch size 1) with per-token positions, and each `SeqSpan`
names the columns that belong to one sequence.

Sliding windows are over token positions, not cache indices: once a press
has evicted tokens (or a window layer dropped blocks no query can see), the
two differ, and the cache's record of each token's position decides what a
windowed layer's query sees. Without a window the masks stay index-based
(new tokens are the last of every head), and plain prefill and decode take
SDPA's unmasked paths.

Presses do not run here. A span that asks for it records its queries per
layer (a press's input besides the keys and values, which are in the pool
anyway); the runner runs the presses after the forward pass from them.

Devices. Block tables are host bookkeeping (`cache/paged.py`); a step's
tables (new slots, the `DecodeBatch`, each other cached span's `SpanTables`)
are built on the host and copied to the pool's device once per step, when
the `ForwardContext` is made, so that no layer copies a table or waits for
the device to learn a length.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvengine.cache.paged import KVPool, SequenceKV
from kvengine.cache.pool import HOST
from kvengine.engine.kernel import PagedDecode
from kvengine.engine.selection import BlockSelection, SelectionStats, dense_selection, select_blocks

ATTENTION_NAME = "kvengine"


@dataclass
class SpanTables:
    """One sequence's cache tables for every layer, on the pool's device; built once per step.

    What `SequenceKV.context` and `token_positions` give per layer, with the
    host-side lengths read once (`span_tables`), so a layer neither syncs nor copies.
    """

    slots: torch.Tensor  # (L, H_kv, T) slot of each cached token; the zero slot past a head's length
    lens: torch.Tensor  # (L, H_kv) tokens each cell holds
    positions: torch.Tensor  # (L, H_kv, T) position of each cached token
    widths: list[int]  # per layer: tokens its longest head holds
    uniform: list[bool]  # per layer: whether every head holds `widths[layer]` tokens

    def context(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Slots `(H_kv, T)` of one layer and its per-head lengths (None when all hold T), as `SequenceKV`'s."""
        width = self.widths[layer]
        return self.slots[layer, :, :width], (None if self.uniform[layer] else self.lens[layer])

    def token_positions(self, layer: int) -> torch.Tensor:
        """Positions `(H_kv, T)` of one layer's cached tokens, aligned with `context(layer)`."""
        return self.positions[layer, :, : self.widths[layer]]


def span_tables(kv: SequenceKV, zero_slot: int, device: torch.device) -> SpanTables:
    """`kv`'s tables for every layer, padding masked to `zero_slot`, copied to `device` in one go."""
    lens = kv.lens  # (L, H) on the host: reading lengths here waits for no device
    widths = lens.max(dim=1).values  # (L,)
    width = int(widths.max())
    slots = _cut(kv.slots, width).masked_fill(torch.arange(width, device=HOST) >= lens[..., None], zero_slot)
    return SpanTables(
        slots.to(device),
        lens.to(device),
        _cut(kv.positions, width).to(device),
        widths.tolist(),
        (lens == widths[:, None]).all(dim=1).tolist(),
    )


@dataclass
class SeqSpan:
    """The tokens of one sequence inside a packed forward pass."""

    start: int  # first column of this sequence in the packed batch
    end: int  # one past its last column
    kv: SequenceKV  # its cache, already extended by the new tokens
    num_cached: int  # tokens it had cached before this step (0: fresh prefill)
    record_queries: bool = False  # fill `queries` (for a press after the forward)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H_q, T_q, D)
    tables: SpanTables | None = None  # its cache's tables on the device, set by `ForwardContext`


@dataclass
class DecodeBatch:
    """The sequences decoding one token after a cached context: their tables for every layer.

    Built once per step (`decode_batch`), so that a layer runs no Python loop
    over sequences and no host sync. A cell's entries past its length hold the
    pool's zero slot.
    """

    rows: slice | torch.Tensor  # their columns in the packed batch
    slots: torch.Tensor  # (L, N, H_kv, T) pool slot of each cached token
    lens: torch.Tensor  # (L, N, H_kv) tokens each cell holds
    positions: torch.Tensor | None  # (L, N, H_kv, T) token positions; only for window layers

    def to(self, device: torch.device) -> DecodeBatch:
        """This batch with its tensors on `device` (one copy each)."""
        rows = self.rows if isinstance(self.rows, slice) else self.rows.to(device)
        positions = None if self.positions is None else self.positions.to(device)
        return DecodeBatch(rows, self.slots.to(device), self.lens.to(device), positions)


@dataclass
class ForwardContext:
    """Per-step attention metadata: where new tokens go and what each sequence reads."""

    pool: KVPool
    spans: list[SeqSpan]
    new_slots: torch.Tensor  # (L, H_kv, T) pool slot of each new token, per layer and head
    decode: DecodeBatch | None = None  # the plain decoding spans, attended together
    kernel: PagedDecode | None = None  # decode attention in place (kernel.py), else gather + SDPA
    # Query-aware block selection for the decode batch (selection.py): which blocks each cell reads.
    selection: BlockSelection | None = None
    selection_stats: SelectionStats | None = None  # blocks read and held, added to by every layer
    # Reused buffers for keys and values read back from the pool: fresh multi-MB
    # tensors in every layer would cost page faults on each decode step.
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        """Put the step's tables on the pool's device, once for all layers (see the module doc)."""
        device = self.pool.device
        self.new_slots = self.new_slots.to(device)
        for span in self.spans:
            if span.num_cached > 0 and not _is_plain_decode(span):
                span.tables = span_tables(span.kv, self.pool.zero_slot, device)
        stats = self.selection_stats
        if stats is not None and stats.blocks_read.device != device:  # layers add to them there
            stats.blocks_read, stats.blocks_held = stats.blocks_read.to(device), stats.blocks_held.to(device)


def decode_batch(
    spans: list[SeqSpan], zero_slot: int, with_positions: bool, device: torch.device | None = None
) -> DecodeBatch | None:
    """The step's `DecodeBatch` (None when no span is a plain decode), on `device` (default: the host).

    Built from the host's block tables, then copied to `device` in one go.
    """
    members = [i for i, span in enumerate(spans) if _is_plain_decode(span)]
    if not members:
        return None
    kvs = [spans[i].kv for i in members]
    lens = torch.stack([kv.lens for kv in kvs], dim=1)  # (L, N, H)
    width = int(lens.max())
    slots = torch.stack([_cut(kv.slots, width) for kv in kvs], dim=1)
    slots.masked_fill_(torch.arange(width, device=lens.device) >= lens[..., None], zero_slot)
    positions = torch.stack([_cut(kv.positions, width) for kv in kvs], dim=1) if with_positions else None
    columns = [spans[i].start for i in members]
    contiguous = columns == list(range(columns[0], columns[0] + len(columns)))
    rows = slice(columns[0], columns[-1] + 1) if contiguous else torch.tensor(columns, device=HOST)
    batch = DecodeBatch(rows, slots, lens, positions)
    return batch if device is None else batch.to(device)


def _cut(table: torch.Tensor, width: int) -> torch.Tensor:
    """`table` `(L, H, C)` cut or zero-padded to `(L, H, width)`."""
    if table.shape[-1] >= width:
        return table[..., :width]
    return F.pad(table, (0, width - table.shape[-1]))


_CURRENT: ContextVar[ForwardContext | None] = ContextVar("kvengine_forward", default=None)


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    """Make `ctx` the metadata of the model forward run inside this block."""
    if _CURRENT.get() is not None:
        raise RuntimeError("kvengine forward contexts do not nest")
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls; returns `(1, T, H_q, D)` and no weights.

    query `(1, H_q, T, D)`, key and value `(1, H_kv, T, D)`: this step's
    tokens of all sequences, packed. `attention_mask` is ignored: masks come
    from the spans (causal within a sequence, nothing across sequences).
    """
    ctx = _CURRENT.get()
    if ctx is None:
        raise RuntimeError(
            "the 'kvengine' attention implementation only runs inside kvengine's runner "
            "(no forward context is set); use model.set_attn_implementation('sdpa') for plain transformers"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported yet")
    if query.shape[0] != 1:
        raise ValueError(f"kvengine packs sequences into batch size 1, got {query.shape[0]}")
    layer: int = module.layer_idx  # type: ignore[assignment]
    window: int | None = kwargs.get("sliding_window")
    _, num_heads, num_tokens, head_dim = query.shape
    new_k, new_v = key[0], value[0]  # (H_kv, T, D)

    slots = ctx.new_slots[layer]  # (H_kv, T)
    ctx.pool.write(slots.reshape(-1), new_k.reshape(-1, head_dim), new_v.reshape(-1, head_dim))

    out = query.new_empty(num_tokens, num_heads, head_dim)
    if ctx.decode is not None:
        rows = ctx.decode.rows
        scale = scaling if scaling is not None else head_dim**-0.5
        out[rows] = _decode(ctx, ctx.decode, layer, query[0, :, rows].transpose(0, 1), scale, window)
    for span in ctx.spans:
        if ctx.decode is not None and _is_plain_decode(span):
            continue
        q = query[0, :, span.start : span.end]  # (H_q, T_q, D)
        out[span.start : span.end] = _attend_span(ctx, layer, span, q, new_k, new_v, scaling, window)
        if span.record_queries:
            span.queries[layer] = q.clone()
    return out.unsqueeze(0), None


def _attend_span(
    ctx: ForwardContext,
    layer: int,
    span: SeqSpan,
    q: torch.Tensor,
    new_k: torch.Tensor,
    new_v: torch.Tensor,
    scaling: float | None,
    window: int | None,
) -> torch.Tensor:
    """One sequence's queries `(H_q, T_q, D)` over its cache; returns `(T_q, H_q, D)`."""
    positions = None
    if span.num_cached == 0:
        # Fresh prefill: this step's keys are the whole context (every head holds the same
        # tokens, at consecutive positions), no need to read them back.
        k, v = new_k[:, span.start : span.end], new_v[:, span.start : span.end]
        head_lens = None
    else:
        tables = span.tables or span_tables(span.kv, ctx.pool.zero_slot, q.device)
        # (H_kv, T_k); padding past a head's length reads zeros (see KVPool.zero_slot)
        ctx_slots, head_lens = tables.context(layer)
        k, v = ctx.pool.read(ctx_slots.reshape(-1), out=ctx.scratch)
        k = k.view(*ctx_slots.shape, q.shape[-1])
        v = v.view(*ctx_slots.shape, q.shape[-1])
        if window is not None:
            positions = tables.token_positions(layer)  # (H_kv, T_k)
    return attend(q, k, v, scaling, head_lens, window, positions).transpose(0, 1)


def _is_plain_decode(span: SeqSpan) -> bool:
    """One new token after a cached context, with nothing to record for it."""
    return span.end - span.start == 1 and span.num_cached > 0 and not span.record_queries


def _decode(
    ctx: ForwardContext, batch: DecodeBatch, layer: int, q: torch.Tensor, scale: float, window: int | None
) -> torch.Tensor:
    """Attention of N decoding sequences, q `(N, H_q, D)` -> `(N, H_q, D)`.

    The kernel reads the caches where they lie. Without it, each sequence's
    cache is read into a row padded to the longest one (padding reads zeros)
    and masked past each head's length, for one SDPA call; with a window the
    mask compares the positions the caches record. With block selection each
    cell reads only its selected blocks (the same attention over fewer slots).
    """
    slots, lens = batch.slots[layer], batch.lens[layer]  # (N, H_kv, T), (N, H_kv)
    window = window or 0  # 0: no window
    positions = batch.positions[layer] if window and batch.positions is not None else None
    sel = ctx.selection
    if sel is not None and ctx.pool.key_bounds is not None:
        if layer < sel.dense_layers:  # reads every block, and counts them as read
            slots, lens, positions, read, held = dense_selection(slots, lens, positions, ctx.pool.block_size)
        else:
            slots, lens, positions, read, held = select_blocks(
                sel, ctx.pool.key_bounds, q, slots, lens, ctx.pool.zero_slot, positions
            )
        if ctx.selection_stats is not None:
            ctx.selection_stats.add(read, held)
    if ctx.kernel is not None:
        return ctx.kernel(q, ctx.pool.k, ctx.pool.v, slots, lens, positions, window, scale)
    n, num_heads, head_dim = q.shape
    _, num_kv_heads, max_len = slots.shape
    k, v = ctx.pool.read(slots.reshape(-1), out=ctx.scratch)
    k = k.view(n, num_kv_heads, max_len, head_dim)
    v = v.view(n, num_kv_heads, max_len, head_dim)
    mask = torch.arange(max_len, device=slots.device) < lens[..., None]  # (N, H_kv, T)
    if positions is not None:  # the query is the last cached token of each head
        query_pos = positions.gather(2, (lens - 1)[..., None])  # (N, H_kv, 1)
        mask &= positions > query_pos - window
    q4 = q.reshape(n, num_kv_heads, num_heads // num_kv_heads, head_dim)  # query heads folded into rows
    out = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask[:, :, None, :], scale=scale)
    return out.reshape(n, num_heads, head_dim)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scaling: float | None,
    head_lens: torch.Tensor | None = None,
    window: int | None = None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of one sequence's new queries over its cache.

    q `(H_q, T_q, D)`; k, v `(H_kv, T_k, D)`; the queries are the last `T_q`
    tokens of each head's cache. `head_lens` `(H_kv,)`: tokens held per kv-head
    when heads differ (entries past a head's length are padding). `window`:
    a query sees only keys less than `window` positions behind it, by
    `positions` `(H_kv, T_k)`, each cached token's position (default: its
    index in the cache, right only for a cache nothing was evicted from).
    Returns `(H_q, T_q, D)`.
    """
    num_heads, q_len, head_dim = q.shape
    num_kv_heads, k_len, _ = k.shape
    if head_lens is None and window is None:
        if q_len == k_len:  # plain causal prefill: the fastest SDPA path
            out = F.scaled_dot_product_attention(
                q[None], k[None], v[None], is_causal=q_len > 1, scale=scaling, enable_gqa=True
            )
            return out[0]
        if q_len == 1:  # decode: the query sees everything; fold query heads into rows
            group = num_heads // num_kv_heads
            q4 = q.view(1, num_kv_heads, group, head_dim)  # 4-D: SDPA's fast CPU path
            out = F.scaled_dot_product_attention(q4, k[None], v[None], scale=scaling)
            return out.view(num_heads, 1, head_dim)
    mask = _causal_mask(q_len, k_len, head_lens, window, positions, device=q.device)  # (H_kv or 1, T_q, T_k)
    if mask.shape[0] > 1:  # one row per kv-head -> one per query head
        mask = mask.repeat_interleave(num_heads // num_kv_heads, dim=0)
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask[None], scale=scaling, enable_gqa=True
    )
    return out[0]


def _causal_mask(
    q_len: int,
    k_len: int,
    head_lens: torch.Tensor | None,
    window: int | None,
    positions: torch.Tensor | None = None,
    *,
    device: torch.device,
) -> torch.Tensor:
    """Boolean mask `(H_kv or 1, T_q, T_k)` on `device`, True where a query may attend.

    Query i of head h sits at cache index `len_h - T_q + i`: new tokens are
    the last ones of every head, whatever a press evicted before them. The
    window compares `positions` `(H_kv, T_k)` when given, else indices.
    """
    lens = head_lens if head_lens is not None else torch.full((1,), k_len, dtype=torch.int64, device=device)
    q_idx = lens[:, None] - q_len + torch.arange(q_len, device=device)  # (H or 1, T_q)
    k_idx = torch.arange(k_len, device=device)
    mask = k_idx[None, None, :] <= q_idx[:, :, None]
    if window is not None:
        if positions is None:
            k_pos, q_pos = k_idx[None, :], q_idx
        else:
            k_pos, q_pos = positions, positions.gather(1, q_idx.expand(positions.shape[0], -1))  # (H, T_q)
        mask = mask & (k_pos[:, None, :] > q_pos[:, :, None] - window)
    return mask


AttentionInterface.register(ATTENTION_NAME, paged_attention)
