"""Plain transformers forwards over a dense cache, for assembling a prompt's cache outside the engine.

Two forwards, both with the model's own modules under SDPA attention (the
engine's paged attention is switched off for their duration and restored in
`finally`): `prefill_layers` computes the keys and values of tokens at given
positions through the first layers only (a forward hook stops the pass), and
`recompute` computes chosen tokens again over a cache, attending to every
other token at a lower position (not to the stale copies of the chosen ones)
and to the chosen ones up to themselves, through a custom 4D mask.

Caches here are `(L, H_kv, T, D)` tensors of keys (after RoPE) and values.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from kvengine.models import LoadedModel


class _StopForward(Exception):
    """Raised by a hook to end a forward pass after the layers that were wanted."""


@contextmanager
def plain_attention(model: LoadedModel) -> Iterator[None]:
    """Run the model's forwards with SDPA attention meanwhile (not the engine's paged attention)."""
    hf = model.hf_model
    saved = hf.config._attn_implementation
    hf.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            yield
    finally:
        hf.set_attn_implementation(saved)


def _stacked(cache: DynamicCache, num_layers: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(num_layers, H_kv, T, D)` of the cache's first batch row, from column `start` on."""
    keys, values = [], []
    for layer in cache.layers[:num_layers]:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        assert isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor), "a dynamic cache layer"
        keys.append(k[0, :, start:])
        values.append(v[0, :, start:])
    return torch.stack(keys), torch.stack(values)


def prefill_layers(
    model: LoadedModel, token_ids: torch.Tensor, positions: torch.Tensor, num_layers: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values `(num_layers, H_kv, T, D)` of `token_ids` `(T,)` at `positions`, attending causally.

    Only the first `num_layers` layers run (default: all).
    """
    hf = model.hf_model
    num_layers = model.num_layers if num_layers is None else num_layers
    cache = DynamicCache(config=hf.config)
    layers = model.adapter.layers(hf)

    def stop(*_: object) -> None:
        raise _StopForward

    hook = layers[num_layers - 1].register_forward_hook(stop) if num_layers < model.num_layers else None
    try:
        with plain_attention(model):
            hf(
                input_ids=token_ids[None],
                position_ids=positions[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    except _StopForward:
        pass
    finally:
        if hook is not None:
            hook.remove()
    return _stacked(cache, num_layers)


def recompute(
    model: LoadedModel,
    token_ids: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    chosen: torch.Tensor,
) -> None:
    """Compute the tokens at indices `chosen` (sorted, `(n,)`) again over the cache, in place.

    `token_ids` `(T,)` are the cache's tokens at positions 0..T-1; `keys` and
    `values` `(L, H_kv, T, D)` their cache, the rows of `chosen` stale (never
    read). Token i of `chosen` attends to every unchosen token at a lower
    position and to the chosen ones up to itself, layer by layer with the
    freshly computed states, as CacheBlend's selective recompute does.
    """
    if chosen.numel() == 0:
        return
    hf = model.hf_model
    total = keys.shape[2]
    cache = DynamicCache(config=hf.config)
    for layer in range(model.num_layers):
        cache.update(keys[layer][None].to(hf.dtype), values[layer][None].to(hf.dtype), layer)
    is_chosen = torch.zeros(total, dtype=torch.bool)
    is_chosen[chosen] = True
    old = (torch.arange(total)[None] < chosen[:, None]) & ~is_chosen[None]  # (n, T)
    new = chosen[None] <= chosen[:, None]  # (n, n)
    mask = torch.cat([old, new], dim=1)[None, None]  # (1, 1, n, T + n): True attends
    with plain_attention(model):
        hf(
            input_ids=token_ids[chosen][None],
            position_ids=chosen[None],
            attention_mask=mask,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
    fresh_k, fresh_v = _stacked(cache, model.num_layers, start=total)
    keys[:, :, chosen] = fresh_k.to(keys.dtype)
    values[:, :, chosen] = fresh_v.to(values.dtype)
