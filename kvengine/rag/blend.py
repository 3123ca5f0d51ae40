"""Assembling a prompt's cache from reused chunks: re-rotation, then selective recompute (CacheBlend).

Modes (`BLEND_MODES`):

- "full": nothing reused, the whole prompt is prefilled (the reference);
- "reuse": each chunk's cached keys are re-rotated to where it lands and used
  as they are; only tokens no chunk covers are computed;
- "blend": CacheBlend (Yao et al., 2024, "CacheBlend: Fast Large Language
  Model Serving for RAG with Cached Knowledge Fusion"): the whole context is
  run through the first `select_layer + 1` layers, whose fresh keys and values
  replace the reused ones there; in each reused chunk the `recompute_ratio`
  share of tokens whose keys and values deviate most from the reused ones at
  layer `select_layer` is chosen, and only those (and uncovered tokens) are
  computed again through every layer over the mixed cache.

Two settings against the "attention sink" of chunks prefilled on their own
(Xiao et al., 2023; EPIC's LegoLink, Hu et al., 2024): a chunk computed at
position 0 makes its first tokens sinks, keys that draw outsized attention;
placed mid-prompt they keep pulling it.

- `sink_tokens`: each moved chunk's first `sink_tokens` tokens are always
  recomputed (with "reuse", this is LegoLink; with "blend", on top of the
  deviation-based choice);
- `anchor`: "head" computes each chunk after the prompt's own text before its
  first chunk (the head: chat template, system message), whose cache is the
  true prefix and is not copied again on reuse, so a chunk's first tokens are
  not sinks and a chunk right after the head is exact (`ANCHORS`; "none":
  chunks alone at position 0).

A piece placed where it was computed (`start == origin`: same tokens, same
positions, same preceding tokens) is exact, and never chosen for recompute.

This module only computes tensors; reading chunks is chunks.py, and handing
the result to the engine is api.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.rag.dense import prefill_layers, recompute
from kvengine.rag.rotation import rotate

BLEND_MODES = ("full", "reuse", "blend")
ANCHORS = ("none", "head")  # what a chunk is computed after: nothing (position 0), or the prompt's head


@dataclass(frozen=True)
class BlendConfig:
    """How a prompt's chunks are reused: `mode`, the share recomputed, the layer that selects, sinks, anchor."""

    mode: str = "blend"
    recompute_ratio: float = 0.15
    select_layer: int = 1
    sink_tokens: int = 0  # each moved chunk's first tokens always recomputed ("reuse" and "blend")
    anchor: str = "none"  # "head": chunks computed after the prompt's head (see ANCHORS)

    def __post_init__(self) -> None:
        if self.mode not in BLEND_MODES:
            raise InvalidRequestError(f"unknown blend mode {self.mode!r}; known: {', '.join(BLEND_MODES)}")
        if not 0.0 <= self.recompute_ratio <= 1.0:  # also rejects NaN
            raise InvalidRequestError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if (
            isinstance(self.select_layer, bool)
            or not isinstance(self.select_layer, int)
            or self.select_layer < 0
        ):
            raise InvalidRequestError(f"select_layer must be an integer >= 0, got {self.select_layer!r}")
        if (
            isinstance(self.sink_tokens, bool)
            or not isinstance(self.sink_tokens, int)
            or self.sink_tokens < 0
        ):
            raise InvalidRequestError(f"sink_tokens must be an integer >= 0, got {self.sink_tokens!r}")
        if self.anchor not in ANCHORS:
            raise InvalidRequestError(f"unknown anchor {self.anchor!r}; known: {', '.join(ANCHORS)}")


@dataclass(frozen=True)
class Piece:
    """Cached keys and values `(L, H_kv, n, D)` computed at positions `origin`..`origin + n - 1`, placed at `start`."""

    start: int
    keys: torch.Tensor
    values: torch.Tensor
    origin: int = 0  # the position its first token was computed at (after an anchor: the anchor's length)

    @property
    def end(self) -> int:
        return self.start + int(self.keys.shape[2])


@dataclass(frozen=True)
class Assembled:
    """A context's cache `(L, H_kv, T, D)` and how it was made."""

    keys: torch.Tensor
    values: torch.Tensor
    num_reused: int  # tokens whose cache came from a piece and was kept at every layer above selection
    num_recomputed: int  # tokens computed through every layer (uncovered ones included)


def place(
    model: LoadedModel, pieces: list[Piece], num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pieces' keys re-rotated to their places in a `(L, H_kv, num_tokens, D)` cache; and what they cover."""
    num_layers, num_kv_heads, dim = model.num_layers, model.num_kv_heads, model.head_dim
    keys = torch.zeros(num_layers, num_kv_heads, num_tokens, dim, dtype=model.dtype)
    values = torch.zeros_like(keys)
    covered = torch.zeros(num_tokens, dtype=torch.bool)
    deltas = torch.tensor([piece.start - piece.origin for piece in pieces], dtype=torch.long)
    angles = [model.adapter.rope(model.hf_model, layer)(deltas) for layer in range(num_layers)]
    cos = torch.stack([c for c, _ in angles], dim=1)[:, :, None, None]  # (P, L, 1, 1, D)
    sin = torch.stack([s for _, s in angles], dim=1)[:, :, None, None]
    for i, piece in enumerate(pieces):
        if piece.end > num_tokens or bool(covered[piece.start : piece.end].any()):
            raise InvalidRequestError(f"a chunk at [{piece.start}, {piece.end}) overlaps another or the end")
        moved = rotate(piece.keys, cos[i], sin[i]) if piece.start != piece.origin else piece.keys
        keys[:, :, piece.start : piece.end] = moved.to(model.dtype)
        values[:, :, piece.start : piece.end] = piece.values.to(model.dtype)
        covered[piece.start : piece.end] = True
    return keys, values, covered


def assemble(model: LoadedModel, token_ids: list[int], pieces: list[Piece], config: BlendConfig) -> Assembled:
    """The cache of `token_ids` (positions 0..T-1) made from `pieces` as `config` says ("reuse" or "blend")."""
    if config.mode == "full":
        raise InvalidRequestError("mode 'full' reuses nothing: prefill the prompt instead of assembling it")
    ids = torch.tensor(token_ids, dtype=torch.long)
    keys, values, covered = place(model, pieces, len(token_ids))
    chosen = ~covered
    for piece in pieces:
        if piece.start != piece.origin:  # a moved piece: its first tokens were sinks where computed
            chosen[piece.start : min(piece.end, piece.start + config.sink_tokens)] = True
    if config.mode == "blend" and config.recompute_ratio > 0:
        chosen |= _select(model, ids, keys, values, pieces, config)
    index = chosen.nonzero().flatten()
    recompute(model, ids, keys, values, index)
    return Assembled(keys, values, int(covered.sum()) - int((chosen & covered).sum()), index.numel())


def _select(
    model: LoadedModel,
    ids: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    pieces: list[Piece],
    config: BlendConfig,
) -> torch.Tensor:
    """CacheBlend's choice: per moved piece, the tokens deviating most at `select_layer`.

    Also writes the fresh keys and values of the first `select_layer + 1`
    layers (computed for every token to choose) into the cache.
    """
    num_layers = min(config.select_layer + 1, model.num_layers)
    first = min(pieces, key=lambda piece: piece.start, default=None)
    exact = first.end if first is not None and first.start == first.origin == 0 else 0  # a true prefix
    exact = min(exact, ids.numel() - 1)
    known = (keys[:num_layers, :, :exact], values[:num_layers, :, :exact])
    fresh_k, fresh_v = prefill_layers(model, ids, torch.arange(ids.numel()), num_layers, known)
    top = num_layers - 1
    deviation = (fresh_k[top].float() - keys[top].float()).square().sum(dim=(0, 2))
    deviation += (fresh_v[top].float() - values[top].float()).square().sum(dim=(0, 2))  # (T,)
    keys[:num_layers] = fresh_k.to(keys.dtype)
    values[:num_layers] = fresh_v.to(values.dtype)
    chosen = torch.zeros(ids.numel(), dtype=torch.bool)
    for piece in pieces:
        n = piece.end - piece.start
        k = min(n, math.ceil(config.recompute_ratio * n))
        if piece.start == piece.origin or k == 0:
            continue  # a piece where it was computed is exact
        worst = deviation[piece.start : piece.end].topk(k).indices + piece.start
        chosen[worst] = True
    return chosen
