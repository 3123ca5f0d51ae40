"""`KVEngineCache`: kvengine's paged cache and presses inside a user's own `model.generate`.

A `transformers.Cache` subclass (the seam DESIGN.md names for where a cache
object must be passed). Entered as a context manager, it switches the model
to kvengine's cache attention (`hf_attention.py`) and back on the way out,
even on an exception, and gives its blocks back to its pool:

    with KVEngineCache(model, press=SnapKVPress(compression_ratio=0.5)) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)

The keys and values live in a kvengine `BlockPool`, in blocks of one (layer,
kv-head), with `PagedKVCache` block tables, as in the engine. The first
forward pass over an empty cache (generate's prefill) records each layer's
queries; once its last layer has run, the press compresses every layer
exactly as the engine's runner does (same `PressInput`, same `retain`), so
the evicted tokens' blocks go back to the pool head by head and
`bytes_held` is what the cache really holds. Later tokens are appended
uncompressed.

It is not the engine: one sequence (batch size 1), no prefix cache, no
decoding-time budget, no KIVI storage, no beam search or cache cropping
(those raise). Positions are counted by the cache (`get_seq_length` is the
number of tokens seen, compressed or not), so generate's positions stay
right after a press shortened the cache.
"""

from __future__ import annotations

from contextlib import ExitStack
from types import TracebackType
from typing import Any

import torch
from transformers import Cache, PreTrainedModel
from transformers.cache_utils import CacheLayerMixin

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.compat import hf_attention
from kvengine.errors import InvalidRequestError, OutOfBlocksError
from kvengine.models import LoadedModel, adapter_for
from kvengine.models.own_attention import use_attention
from kvengine.press.base import Press, PressInput
from kvengine.press.registry import press_from_spec


class _PagedLayer(CacheLayerMixin):
    """One layer's face of a `KVEngineCache` for transformers; the cache does the work."""

    is_sliding = False
    supports_early_init = False

    def __init__(self, owner: KVEngineCache, layer: int) -> None:
        super().__init__()
        self.owner = owner
        self.layer = layer
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.owner.write_layer(self.layer, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.owner.get_seq_length()

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        return None


class KVEngineCache(Cache):
    """A paged KV cache for `model.generate(..., past_key_values=cache)`, with an optional press.

    `model`: a transformers causal LM of a family kvengine has an adapter for
    (or a `LoadedModel`); anything else raises UnsupportedModelError.
    `press`: a `Press` (kvpress's class names and `compression_ratio` work,
    see `kvengine.compat`), a registered name or spec such as "snapkv" or
    "adakv:snapkv" (with `ratio` or its kvpress name `compression_ratio`), or
    None for no compression. The pool holds `max_tokens` tokens per (layer,
    kv-head) (default: the model's context length) in blocks of
    `block_size`, in the model's dtype, on its device.
    """

    def __init__(
        self,
        model: PreTrainedModel | LoadedModel,
        press: Press | str | None = None,
        *,
        ratio: float | None = None,
        compression_ratio: float | None = None,
        max_tokens: int | None = None,
        block_size: int = 16,
    ) -> None:
        self.model = model if isinstance(model, LoadedModel) else _wrap(model)
        self.press = _make_press(press, ratio, compression_ratio)
        m = self.model
        self.max_tokens = m.max_context_len if max_tokens is None else max_tokens
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise InvalidRequestError(f"block_size must be a positive int, got {block_size!r}")
        blocks_per_cell = -(-self.max_tokens // block_size)
        # One layer more than the tokens need: a press moves a layer's kept tokens into
        # fresh blocks before it releases the old ones.
        num_blocks = (m.num_layers + 1) * m.num_kv_heads * blocks_per_cell
        device = next(m.hf_model.parameters()).device
        self.pool = BlockPool(num_blocks, block_size, m.head_dim, m.dtype, device)
        self.paged = PagedKVCache(self.pool, m.num_layers, m.num_kv_heads)
        self.seq = self.paged.new_sequence()
        self._scaling = float(m.adapter.attention(m.hf_model, 0).scaling)  # type: ignore[arg-type]
        self._next_layer = 0  # the layer whose update comes next; 0 between forward passes
        self._new_slots: torch.Tensor | None = None  # (L, H_kv, n) this forward's slots
        self._queries: dict[int, torch.Tensor] | None = None  # layer -> (H_q, T, D), while a press waits
        self._stack: ExitStack | None = None
        #: (bytes held before, after) the press, once it has run.
        self.compression: tuple[int, int] | None = None
        super().__init__(layers=[_PagedLayer(self, layer) for layer in range(m.num_layers)])

    # ---- the context: attention implementation in, blocks out ----------------------------

    def __enter__(self) -> KVEngineCache:
        if self._stack is not None:
            raise InvalidRequestError("this KVEngineCache is already entered")
        with ExitStack() as stack:  # undone at once if a step fails
            stack.enter_context(hf_attention.activate(self))
            stack.enter_context(use_attention(self.model.hf_model, hf_attention.ATTENTION_NAME))
            self._stack = stack.pop_all()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if stack is not None:
                stack.close()
        finally:
            self.free()

    def free(self) -> None:
        """Give every block back to the pool; the cache is empty (and reusable) afterwards."""
        with torch.inference_mode():
            self.paged.free(self.seq)
        self._next_layer, self._new_slots, self._queries = 0, None, None

    # ---- what it holds -------------------------------------------------------------------

    @property
    def bytes_held(self) -> int:
        """Bytes of the blocks this cache holds in its pool now (measured, not nominal)."""
        return self.paged.bytes_held(self.seq)

    @property
    def bytes_full(self) -> int:
        """Bytes the same pool would hold for every token seen so far, with no press."""
        return self.paged.blocks_for_tokens(self.seq.next_pos) * self.pool.bytes_per_block

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens seen so far (the next token's position), however many a press evicted."""
        return self.seq.next_pos

    def head_lens(self, layer: int) -> torch.Tensor | None:
        return self.seq.context(layer)[1]

    def token_positions(self, layer: int) -> torch.Tensor:
        return self.seq.token_positions(layer)

    # ---- the forward pass ----------------------------------------------------------------

    def write_layer(
        self, layer: int, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache one layer's new keys and values `(1, H_kv, n, D)`; its whole cache, padded.

        Returns keys and values `(1, H_kv, T, D)`, `T` the longest head;
        entries past a head's length read zeros (`head_lens` says where).
        """
        if self._stack is None:
            raise InvalidRequestError(
                "use a KVEngineCache inside `with KVEngineCache(model, ...) as cache:` "
                "(it sets the model's attention implementation for the block)"
            )
        if layer != self._next_layer:
            raise InvalidRequestError(
                f"the cache expected layer {self._next_layer}, got layer {layer}: a forward pass "
                "stopped midway; start again with a new cache (or after free())"
            )
        with torch.inference_mode():
            if layer == 0:
                self._begin_forward(key_states)
            assert self._new_slots is not None
            slots = self._new_slots[layer].reshape(-1)  # (H_kv * n,)
            head_dim = key_states.shape[-1]
            k_new = key_states[0].reshape(-1, head_dim).to(self.pool.dtype)
            self.pool.write(slots, k_new, value_states[0].reshape(-1, head_dim).to(self.pool.dtype))
            ctx_slots, lens = self.seq.context(layer)  # (H_kv, T)
            if lens is not None:  # padding reads zeros
                pad = torch.arange(ctx_slots.shape[1]) >= lens[:, None]
                ctx_slots = ctx_slots.masked_fill(pad, self.pool.zero_slot)
            k, v = self.pool.read(ctx_slots.reshape(-1))
        self._next_layer = (layer + 1) % self.model.num_layers
        return k.view(1, *ctx_slots.shape, head_dim), v.view(1, *ctx_slots.shape, head_dim)

    def _begin_forward(self, key_states: torch.Tensor) -> None:
        """Reserve slots for this forward's new tokens in every layer; arm the press at prefill."""
        batch, _, num_new, _ = key_states.shape
        if batch != 1:
            raise InvalidRequestError(
                f"a KVEngineCache holds one sequence, got a batch of {batch}: give each prompt "
                "its own cache (kvengine.generate batches many prompts over one pool)"
            )
        prefill = self.seq.next_pos == 0
        if prefill and self.press is not None:
            self.press.validate(num_new, self.model.num_layers)
        try:
            self._new_slots = self.paged.append(self.seq, num_new)
        except OutOfBlocksError:
            raise OutOfBlocksError(
                f"the KVEngineCache holds {self.max_tokens} tokens (max_tokens); "
                f"{self.seq.max_len + num_new} do not fit: pass a larger max_tokens"
            ) from None
        self._queries = {} if prefill and self.press is not None else None

    def observe(self, layer: int, queries: torch.Tensor) -> None:
        """Record a layer's prefill queries `(H_q, T, D)` for the press; run it after the last layer."""
        if self._queries is None:
            return
        self._queries[layer] = queries.detach().clone()
        if layer == self.model.num_layers - 1:
            queries_by_layer, self._queries = self._queries, None
            with torch.inference_mode():
                self._compress(queries_by_layer)

    def _compress(self, queries: dict[int, torch.Tensor]) -> None:
        """Keep in each layer what the press keeps (as the engine's runner does)."""
        assert self.press is not None
        before = self.bytes_held
        m = self.model
        for layer in range(m.num_layers):
            slots, _ = self.seq.context(layer)  # (H_kv, T): all heads alike before the press
            k, v = self.pool.read(slots.reshape(-1))
            num_tokens, end = slots.shape[1], self.seq.next_pos
            inp = PressInput(
                layer=layer,
                num_layers=m.num_layers,
                keys=k.view(*slots.shape, -1),
                values=v.view(*slots.shape, -1),
                queries=queries[layer],
                scaling=self._scaling,
                positions=torch.arange(end - num_tokens, end),
                rope=m.adapter.rope(m.hf_model, layer),
            )
            self.paged.retain(self.seq, layer, self.press.keep(inp))
        self.compression = (before, self.bytes_held)

    # ---- what generate may ask and this cache does not do ---------------------------------

    def reset(self) -> None:
        self.free()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("KVEngineCache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("KVEngineCache holds one sequence: beam search is not supported")

    def batch_repeat_interleave(self, repeats: int) -> None:
        if repeats != 1:
            raise InvalidRequestError("KVEngineCache holds one sequence: num_return_sequences must be 1")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("KVEngineCache holds one sequence: it cannot select batch rows")


def _wrap(model: object) -> LoadedModel:
    """A transformers model as a `LoadedModel` (its family checked), else a clear error."""
    if not isinstance(model, PreTrainedModel):
        raise InvalidRequestError(
            f"KVEngineCache needs a transformers PreTrainedModel or a kvengine LoadedModel, got {type(model).__name__}"
        )
    # Not LoadedModel.from_hf: the user's model keeps its mode and its parameters' grad flags.
    return LoadedModel(name="custom", hf_model=model, tokenizer=None, adapter=adapter_for(model.config))


def _make_press(
    press: Press | str | None, ratio: float | None, compression_ratio: float | None
) -> Press | None:
    """The press asked for: an instance as given, or built from a name and a ratio."""
    if ratio is not None and compression_ratio is not None:
        raise InvalidRequestError("give ratio or compression_ratio (kvpress's name), not both")
    ratio = compression_ratio if ratio is None else ratio
    if isinstance(press, Press):
        if ratio is not None:
            raise InvalidRequestError(
                "the press has its own ratio: give ratio to the press, not to the cache"
            )
        return press
    if isinstance(press, str):
        return press_from_spec(press, 0.0 if ratio is None else ratio)
    if press is None:
        if ratio:
            raise InvalidRequestError(f"a ratio of {ratio} needs a press (press=...)")
        return None
    raise InvalidRequestError(
        f"press must be a kvengine Press, a press name or None, got {type(press).__name__}"
    )
