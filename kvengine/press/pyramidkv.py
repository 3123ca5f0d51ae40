"""PyramidKV press: SnapKV scores under a per-layer budget that shrinks with depth."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import PressInput, top_k_per_head
from kvengine.press.registry import register_press
from kvengine.press.snapkv import SnapKVPress


@register_press("pyramidkv")
@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV with a pyramid of layer budgets (Cai et al. 2024, PyramidKV, arXiv:2406.02069).

    Lower layers keep more tokens, higher layers fewer; the budgets fall
    linearly with the layer and average to `T * (1 - ratio)` over the layers.
    All kv-heads of a layer keep the same number of tokens (`layer_budget`),
    chosen by SnapKV's scores. The budget is kvpress's PyramidKVPress formula
    (itself KVCache-Factory's, rescaled so that the ratio always applies),
    including its fallback to the uniform SnapKV budget `round(T * (1 - ratio))`
    when the pyramid would not fit between the window and the prompt; `beta`
    sets the steepness (the top layer keeps `1 / beta` of the average unless
    the bottom layer's share is capped at `T - window_size`).

    Differences from kvpress: a one-layer model uses the fallback budget
    (kvpress divides by zero), a budget is at least 1, and ratio 0 keeps
    everything (as kvpress, which skips compression then).
    """

    beta: float = 20
    press_name: ClassVar[str] = "pyramidkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or not self.beta >= 1:
            raise InvalidRequestError(f"pyramidkv: beta must be a number >= 1, got {self.beta!r}")

    def layer_budget(self, num_tokens: int, layer: int, num_layers: int) -> int:
        """Tokens each kv-head of `layer` (of `num_layers`) keeps out of `num_tokens`."""
        kept = num_tokens * (1 - self.ratio)  # the average budget over layers
        min_num = kept / self.beta
        max_num = 2 * kept - min_num
        if max_num >= num_tokens - self.window_size:
            max_num = num_tokens - self.window_size
            min_num = 2 * kept - max_num
        fits = num_tokens >= max_num >= min_num >= self.window_size
        if not fits or num_layers < 2:
            return min(num_tokens, max(1, round(kept)))
        steps = (max_num - min_num) / (num_layers - 1)
        return min(num_tokens, max(1, round(max_num - layer * steps)))

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        num_tokens = inp.num_tokens
        budget = num_tokens if self.ratio == 0 else self.layer_budget(num_tokens, inp.layer, inp.num_layers)
        if budget >= num_tokens:
            return [torch.arange(num_tokens, device=inp.keys.device) for _ in range(inp.num_kv_heads)]
        return top_k_per_head(self.score(inp), budget)
