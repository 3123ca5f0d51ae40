"""Plain transformers forwards over a dense cache, for assembling a prompt's cache outside the engine.

Two forwards, both with the model's own modules under SDPA attention (the
engine's paged attention is switched off for their duration and restored in
`finally`, so they must never run beside an engine step: the server runs them
on its driver, between steps): `prefill_layers` computes the keys and values
of tokens at given positions through the first layers only, and `recompute`
computes chosen tokens again over a cache, attending to every token at a
position up to their own (the chosen ones with their fresh states).

Both use a transformers `Cache` of their own rather than hooks on modules:
`prefill_layers` stops the pass as soon as its last wanted layer's keys and
values are stored (that layer's attention and MLP never run), and
`recompute` writes each layer's fresh rows into the caller's tensors in place
(no concatenated copy of the context per layer, no stale rows attended to).
`recompute` also runs its own attention function (`recompute_attention`,
registered with transformers as "kvengine_recompute"): SDPA per group of
chosen tokens over only the keys that group may see.

Caches here are `(L, H_kv, T, D)` tensors of keys (after RoPE) and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, Cache, DynamicCache
from transformers.cache_utils import CacheLayerMixin

from kvengine.models import LoadedModel
from kvengine.models.own_attention import use_attention

RECOMPUTE_ATTENTION = "kvengine_recompute"  # registered below, used by `recompute` only
_QUERY_GROUP = 32  # queries per SDPA call in `recompute`: each call reads keys up to its last query only


class _StopForward(Exception):
    """Raised by the cache to end a forward pass once the wanted layers' keys and values are in."""


@contextmanager
def plain_attention(model: LoadedModel, implementation: str = "sdpa") -> Iterator[None]:
    """Run the model's forwards with `implementation` meanwhile (not the engine's paged attention)."""
    with use_attention(model.hf_model, implementation), torch.inference_mode():
        yield


class _StoppingCache(DynamicCache):
    """A dynamic cache that ends the forward pass right after layer `last` stored its keys and values."""

    def __init__(self, config: Any, last: int) -> None:
        super().__init__(config=config)
        self.last = last

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if layer_idx >= self.last:
            raise _StopForward
        return out


def _stacked(cache: DynamicCache, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(num_layers, H_kv, T, D)` of the cache's first batch row."""
    keys, values = [], []
    for layer in cache.layers[:num_layers]:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor), "a dynamic cache layer"
        keys.append(k[0])
        values.append(v[0])
    return torch.stack(keys), torch.stack(values)


def prefill_layers(
    model: LoadedModel,
    token_ids: torch.Tensor,
    positions: torch.Tensor,
    num_layers: int | None = None,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(num_layers, H_kv, T, D)` of `token_ids` `(T,)` at `positions`, attending causally.

    Only the first `num_layers` layers run (default: all), the last of them
    only up to its keys and values. `known`: the exact keys and values
    `(>= num_layers, H_kv, p, D)` of the first p tokens (a true prefix), which
    are then not computed again (p < T).
    """
    hf = model.hf_model
    num_layers = model.num_layers if num_layers is None else num_layers
    cache = _StoppingCache(hf.config, num_layers - 1)
    skip = 0
    if known is not None and known[0].shape[2] > 0:
        skip = int(known[0].shape[2])
        for layer in range(num_layers):
            DynamicCache.update(cache, known[0][layer][None], known[1][layer][None], layer)
    try:
        with plain_attention(model):
            hf(
                input_ids=token_ids[skip:][None],
                position_ids=positions[skip:][None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    except _StopForward:
        pass
    return _stacked(cache, num_layers)


class _InPlaceLayer(CacheLayerMixin):
    """One layer's dense cache `(1, H_kv, T, D)` whose update overwrites the rows `index` in place."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.index = keys, values, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.keys is not None and self.values is not None
        self.keys[:, :, self.index] = key_states.to(self.keys.dtype)
        self.values[:, :, self.index] = value_states.to(self.values.dtype)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length(), 0

    def get_seq_length(self) -> int:
        assert self.keys is not None
        return int(self.keys.shape[-2])

    def get_max_length(self) -> int:
        return self.get_seq_length()


def recompute(
    model: LoadedModel,
    token_ids: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    """Compute the tokens at indices `chosen` (sorted, `(n,)`) again over the cache, in place.

    `token_ids` `(T,)` are the cache's tokens at positions 0..T-1; `keys` and
    `values` `(L, H_kv, T, D)` their cache (in the model's dtype), the rows
    of `chosen` stale. Layer by layer, the chosen tokens' fresh keys and
    values replace their rows before that layer's attention, and token i of
    `chosen` attends to every token at a position up to its own: the
    unchosen ones as cached, the chosen ones fresh, as CacheBlend's selective
    recompute does.
    """
    if chosen.numel() == 0:
        return
    hf = model.hf_model
    total = keys.shape[2]
    layers: list[Any] = [
        _InPlaceLayer(keys[i][None], values[i][None], chosen) for i in range(model.num_layers)
    ]
    mask = (torch.arange(total)[None] <= chosen[:, None])[None, None]  # (1, 1, n, T): True attends
    with plain_attention(model, RECOMPUTE_ATTENTION):
        hf(
            input_ids=token_ids[chosen][None],
            position_ids=chosen[None],
            attention_mask=mask,
            past_key_values=Cache(layers=layers),
            use_cache=True,
            logits_to_keep=1,
        )


def recompute_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """`recompute`'s attention: query `(1, H_q, n, D)` over key/value `(1, H_kv, T, D)`; returns `(1, n, H_q, D)`.

    The mask `(1, 1, n, T)` must be `recompute`'s: row i allows the keys up to
    query i's position, and positions grow with i. Queries go to SDPA in
    groups of `_QUERY_GROUP` with only the keys their last one may see (on
    average about half the context instead of all of it), and each kv-head's
    query heads are folded into its rows, so keys are never repeated per
    query head. Same result as SDPA over the whole mask.
    """
    if attention_mask is None or attention_mask.dtype != torch.bool or query.shape[0] != 1:
        raise ValueError(f"{RECOMPUTE_ATTENTION!r} runs only inside kvengine.rag.dense.recompute")
    _, num_heads, n, dim = query.shape
    num_kv_heads = key.shape[1]
    group = num_heads // num_kv_heads
    rows = attention_mask[0, 0]  # (n, T)
    ends = rows.sum(dim=-1).tolist()  # keys each query sees: a prefix of the context
    q = query.view(num_kv_heads, group, n, dim)
    out = torch.empty_like(q)
    for a in range(0, n, _QUERY_GROUP):
        b = min(n, a + _QUERY_GROUP)
        end, m = int(ends[b - 1]), b - a
        mask = rows[a:b, :end].expand(group, m, end).reshape(1, group * m, end)
        part = F.scaled_dot_product_attention(
            q[:, :, a:b].reshape(num_kv_heads, group * m, dim),
            key[0, :, :end],
            value[0, :, :end],
            attn_mask=mask,
            scale=scaling,
        )  # (H_kv, group * m, D)
        out[:, :, a:b] = part.view(num_kv_heads, group, m, dim)
    return out.view(1, num_heads, n, dim).transpose(1, 2), None


AttentionInterface.register(RECOMPUTE_ATTENTION, recompute_attention)
