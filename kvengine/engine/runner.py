"""Runs the Hugging Face model over a packed batch with kvengine's attention.

The runner turns "these sequences get these new tokens" into one forward
pass: it reserves cache slots for the new tokens, packs all tokens into one
row with per-token positions, sets the forward context the attention function
reads, and returns the logits of each sequence's last new token (and, for
inputs that ask, of every new token: prompt log-probabilities need them).

Presses run here, after the forward pass, and nowhere else: the attention
function records the queries a press needs, the runner reads each layer's
keys and values back from the pool, builds one `PressInput` per layer
(`_press_input`, with the model's softmax scale) and keeps what the press
keeps (`PagedKVCache.retain`). Then, for inputs that allow it, sliding-window
layers release the blocks no later query's window reaches
(`PagedKVCache.release_outside_window`).

It knows nothing about scheduling, sampling or text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvengine.cache.demote import demote_layer
from kvengine.cache.paged import PagedKVCache, SequenceKV
from kvengine.engine.attention import (
    ATTENTION_NAME,
    DecodeBatch,
    ForwardContext,
    SeqSpan,
    decode_batch,
    forward_context,
)
from kvengine.engine.fused import fused_decode_for
from kvengine.engine.kernel import decode_kernel_for
from kvengine.engine.linear import driving, use_small_linear
from kvengine.engine.selection import BlockSelection, SelectionStats
from kvengine.errors import OutOfBlocksError
from kvengine.models import LoadedModel
from kvengine.press.base import Press, PressInput
from kvengine.press.demote import DemotePress


@dataclass
class StepInput:
    """New tokens of one sequence for one forward pass."""

    kv: SequenceKV
    token_ids: list[int]
    start_pos: int  # position (for RoPE) of the first new token
    press: Press | None = None  # compress the whole cache of this sequence after this step
    keep_queries: bool = False  # fill `queries` with this step's queries, per layer
    seal: bool = True  # quantize filled blocks after the step (packed pools only)
    # Release sliding-window layers' blocks that no later query sees, after the step. Not for
    # a cache whose blocks are shared in full later (the prefix cache's) or compressed later.
    free_outside_window: bool = False
    all_logits: bool = False  # fill `logits` with every new token's logits, not only the last's
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (H_q, n, D)
    logits: torch.Tensor | None = None  # (n, vocab) float32, with `all_logits`


class ModelRunner:
    """Owns the model's forward pass; the model's attention goes through the paged cache."""

    def __init__(self, model: LoadedModel, cache: PagedKVCache) -> None:
        self.model = model
        self.cache = cache
        self._scratch_rows = 0
        self._scratch_bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._ropes = [model.adapter.rope(model.hf_model, layer) for layer in range(model.num_layers)]
        self._scaling = float(model.adapter.attention(model.hf_model, 0).scaling)  # type: ignore[arg-type]
        config = model.hf_model.config
        windows = [(layer, model.adapter.sliding_window(config, layer)) for layer in range(model.num_layers)]
        self._windows = [(layer, window) for layer, window in windows if window is not None]
        self._kernel = decode_kernel_for(cache.pool.k.device, cache.pool.seals_blocks)
        self.selection: BlockSelection | None = None
        self.selection_stats = SelectionStats()
        model.hf_model.set_attn_implementation(ATTENTION_NAME)
        use_small_linear(model.hf_model)
        self._fused = fused_decode_for(model, cache.pool, has_windows=bool(self._windows))

    def select_blocks(self, selection: BlockSelection) -> None:
        """Decode with query-aware block selection (`kvengine.engine.selection`) from now on.

        The pool then keeps per-block key bounds; it must hold no block yet
        (ValueError otherwise). `selection_stats` counts blocks read and held.
        """
        self.cache.pool.track_key_bounds()
        self.selection = selection

    def compress(
        self, kv: SequenceKV, queries: dict[int, torch.Tensor], press: Press, end_pos: int | None = None
    ) -> None:
        """Apply `press` to every layer of a cached sequence, given recent queries per layer.

        `queries[layer]` `(H_q, T_q, D)` are the queries of the sequence's last
        T_q tokens; `end_pos` is the position after its last cached token
        (default: the cache length, for a context that starts at position 0).
        """
        self._press(kv, queries, press, end_pos)
        self.cache.seal_full_blocks(kv)

    def _press(
        self, kv: SequenceKV, queries: dict[int, torch.Tensor], press: Press, end_pos: int | None
    ) -> None:
        """Keep in each layer of `kv` the tokens `press` keeps (the one path of every press).

        A demote press keeps its important tokens open and packs the rest (`cache/demote.py`).
        """
        for layer in range(self.model.num_layers):
            inp = self._press_input(kv, layer, queries[layer], end_pos)
            if isinstance(press, DemotePress) and self.cache.pool.seals_blocks:
                demote_layer(
                    self.cache, kv, layer, press.ranking(inp), press.budget_fraction, press.reserved_tokens
                )
                continue
            self.cache.retain(kv, layer, press.keep(inp))

    def _press_input(
        self, kv: SequenceKV, layer: int, queries: torch.Tensor, end_pos: int | None
    ) -> PressInput:
        """One layer of a cached sequence as a press sees it; its heads must hold the same tokens."""
        slots, lens = kv.context(layer)  # (H_kv, T)
        if lens is not None:
            raise NotImplementedError("compressing a cache whose heads hold different numbers of tokens")
        k, v = self.cache.pool.read(slots.reshape(-1))
        num_tokens = slots.shape[1]
        end = num_tokens if end_pos is None else end_pos
        return PressInput(
            layer=layer,
            num_layers=self.model.num_layers,
            keys=k.view(*slots.shape, -1),
            values=v.view(*slots.shape, -1),
            queries=queries,
            scaling=self._scaling,
            positions=torch.arange(end - num_tokens, end, device=k.device),
            rope=self._ropes[layer],
        )

    def _scratch(self, spans: list[SeqSpan]) -> tuple[torch.Tensor, torch.Tensor]:
        """Buffers for the largest context one layer of these spans reads back (grown, kept)."""
        # A span with a cache reads it alone; without the kernel, all decoding spans are also
        # read together, padded to the longest.
        cached = [span.kv.max_len for span in spans if span.num_cached > 0]
        decoding = [span.kv.max_len for span in spans if span.num_cached > 0 and span.end - span.start == 1]
        if self._kernel is not None:
            decoding = []
        rows = max(max(cached, default=0), len(decoding) * max(decoding, default=0)) * self.cache.num_kv_heads
        if self._scratch_bufs is None or rows > self._scratch_rows:
            self._scratch_rows = max(rows, 2 * self._scratch_rows)
            pool = self.cache.pool
            shape = (self._scratch_rows, pool.head_dim)
            self._scratch_bufs = (
                torch.empty(shape, dtype=pool.dtype, device=pool.device),
                torch.empty(shape, dtype=pool.dtype, device=pool.device),
            )
        return self._scratch_bufs

    def forward(self, batch: list[StepInput]) -> torch.Tensor:
        """Logits `(N, vocab)` (float32) of the last new token of each of the N inputs.

        Inputs with `all_logits` also get every new token's logits in `logits`.
        The new tokens' keys and values are in the cache afterwards, and each
        input with a press is compressed. If the pool cannot hold the new
        tokens, OutOfBlocksError is raised before any sequence changes; if a
        press refuses its input (a KVEngineError), the caches of this batch
        are left half compressed, to be freed by the caller.
        """
        if not batch:
            raise ValueError("empty batch")
        needed = sum(self.cache.blocks_needed(item.kv, len(item.token_ids)) for item in batch)
        if not self.cache.pool.can_allocate(needed):
            raise OutOfBlocksError(
                f"this step needs {needed} blocks, the pool has {self.cache.pool.num_free_blocks} free"
            )
        if any(item.press is not None and not item.kv.is_uniform for item in batch):
            raise NotImplementedError("compressing a cache that a press already compressed")
        ctx, tokens, positions = self._pack(batch)
        keep, last = _kept_positions(batch, ctx.spans, device=self.model.device)
        logits = self._logits(ctx, tokens, positions, keep)  # (len(keep), vocab)
        # Presses after the forward, outside inference mode: block tables outlive the step.
        for item, span in zip(batch, ctx.spans, strict=True):
            if item.press is not None:
                self._press(item.kv, span.queries, item.press, item.start_pos + len(item.token_ids))
            if item.keep_queries:
                item.queries.update(span.queries)
        # Drop what no window reaches, then quantize blocks that filled up, after eviction:
        # what stays is quantized once. A context kept for later compression stays in full
        # precision until then.
        for item in batch:
            if item.free_outside_window:
                for layer, window in self._windows:
                    self.cache.release_outside_window(item.kv, layer, window)
            if item.seal:
                self.cache.seal_full_blocks(item.kv)
        for item, row in zip(batch, last, strict=True):
            if item.all_logits:
                item.logits = logits[row - len(item.token_ids) + 1 : row + 1]
        return logits if len(last) == logits.shape[0] else logits[last]

    def _logits(
        self, ctx: ForwardContext, tokens: list[int], positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """The forward pass: float32 logits of the packed positions `keep`.

        A step where every sequence decodes one token with nothing to record
        takes the fused decode op when the model has one (`fused.py`);
        any other step runs the model's own forward through kvengine's attention.
        """
        token_ids = torch.tensor(tokens, device=self.model.device)
        # Block tables are updated in `_pack`, outside inference mode: they outlive this step.
        with torch.inference_mode(), driving():
            decode = ctx.decode
            if (
                self._fused is not None
                and self.selection is None
                and decode is not None
                and _all_decode(decode, ctx)
            ):
                hidden = self._fused(token_ids, positions, ctx.pool, ctx.new_slots, decode.slots, decode.lens)
                return self.model.hf_model.get_output_embeddings()(hidden).float()
            with forward_context(ctx):
                out = self.model.hf_model(
                    input_ids=token_ids[None],
                    position_ids=positions[None],
                    use_cache=False,
                    logits_to_keep=keep,
                )
            return out.logits[0].float()

    def _pack(self, batch: list[StepInput]) -> tuple[ForwardContext, list[int], torch.Tensor]:
        """Reserve slots for the new tokens; the forward context, packed token ids and positions."""
        spans, slots, positions, tokens = [], [], [], []
        start = 0
        for item in batch:
            n = len(item.token_ids)
            if n == 0:
                raise ValueError("a step input without tokens")
            num_cached = item.kv.max_len
            slots.append(self.cache.append(item.kv, n, item.start_pos))
            record = item.keep_queries or item.press is not None
            spans.append(SeqSpan(start, start + n, item.kv, num_cached, record_queries=record))
            positions.append(torch.arange(item.start_pos, item.start_pos + n, device=self.cache.pool.device))
            tokens.extend(item.token_ids)
            start += n
        pool = self.cache.pool
        ctx = ForwardContext(
            pool,
            spans,
            torch.cat(slots, dim=2),
            decode=decode_batch(
                spans, pool.zero_slot, with_positions=bool(self._windows), device=pool.device
            ),
            kernel=self._kernel,
            selection=self.selection,
            selection_stats=self.selection_stats,
            scratch=self._scratch(spans),
        )
        return ctx, tokens, torch.cat(positions)


def _all_decode(decode: DecodeBatch, ctx: ForwardContext) -> bool:
    """Whether the decode batch is every span of the step, in order, over a pool without key bounds."""
    rows = decode.rows
    whole = isinstance(rows, slice) and rows.start == 0 and rows.stop == len(ctx.spans)
    return whole and ctx.pool.key_bounds is None


def _kept_positions(
    batch: list[StepInput], spans: list[SeqSpan], device: torch.device
) -> tuple[torch.Tensor, list[int]]:
    """Packed positions whose logits to compute, and each input's last one as a row of them."""
    keep: list[int] = []
    last = []
    for item, span in zip(batch, spans, strict=True):
        keep.extend(range(span.start, span.end) if item.all_logits else [span.end - 1])
        last.append(len(keep) - 1)
    return torch.tensor(keep, device=device), last
