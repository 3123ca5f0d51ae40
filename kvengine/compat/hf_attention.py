"""The attention function a `KVEngineCache` runs the model's own attention modules with.

Registered with `transformers.AttentionInterface` as "kvengine_cache" (the
engine's own "kvengine" function needs the runner's per-step context, so it
cannot serve a user's `model.generate`). While a `KVEngineCache` is entered,
the model's config selects this function; the cache's `update` has already
written the new keys and values into the pool and handed back each head's
cached tokens, padded to the longest head. This function attends over them
with kvengine's `attend` (per-head lengths, sliding windows over the cached
tokens' positions; transformers builds no mask for a custom attention
function), then hands the step's queries to the cache, which records them for
its press.

It knows nothing about presses or the pool: the cache entered in this
context (`activate`) answers for one layer (`AttentionView`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Protocol

import torch
from transformers import AttentionInterface

from kvengine.engine.attention import attend
from kvengine.errors import InvalidRequestError

ATTENTION_NAME = "kvengine_cache"


class AttentionView(Protocol):
    """What the attention function asks the active cache (a `KVEngineCache`)."""

    def head_lens(self, layer: int) -> torch.Tensor | None:
        """Tokens each kv-head of `layer` holds `(H_kv,)`, or None when all hold the same."""

    def token_positions(self, layer: int) -> torch.Tensor:
        """Positions `(H_kv, T)` of `layer`'s cached tokens, as `update` returned them."""

    def observe(self, layer: int, queries: torch.Tensor) -> None:
        """This step's queries `(H_q, T_q, D)` of `layer`, after its attention ran."""


_ACTIVE: ContextVar[AttentionView | None] = ContextVar("kvengine_hf_cache", default=None)


@contextmanager
def activate(cache: AttentionView) -> Iterator[None]:
    """Make `cache` the one this module's attention function serves; refuses nesting."""
    if _ACTIVE.get() is not None:
        raise InvalidRequestError("KVEngineCache blocks do not nest: leave the one entered first")
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def cache_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function transformers calls; returns `(1, T_q, H_q, D)` and no weights.

    query `(1, H_q, T_q, D)`: this step's queries; key and value
    `(1, H_kv, T, D)`: every cached token of the layer (this step's last),
    padded past each head's length. `attention_mask` is None (transformers
    builds none for a custom function): causality, head lengths and windows
    come from the cache.
    """
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(
            f"the {ATTENTION_NAME!r} attention implementation only runs inside `with KVEngineCache(model, ...)`"
        )
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("attention logit softcapping is not supported yet")
    layer: int = module.layer_idx  # type: ignore[assignment]
    window: int | None = kwargs.get("sliding_window")
    q = query[0]  # (H_q, T_q, D)
    positions = cache.token_positions(layer) if window is not None else None
    out = attend(q, key[0], value[0], scaling, cache.head_lens(layer), window, positions)  # (H_q, T_q, D)
    cache.observe(layer, q)
    return out.transpose(0, 1).unsqueeze(0), None


AttentionInterface.register(ATTENTION_NAME, cache_attention)
