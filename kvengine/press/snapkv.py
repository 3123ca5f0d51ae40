"""SnapKV press: attention of an observation window of the last queries, pooled along tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from kvengine.errors import InvalidRequestError
from kvengine.press.attention import check_int, protect_last
from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press


@register_press("snapkv")
@dataclass
class SnapKVPress(ScorePress):
    """Keeps the observation window and the tokens it attends to (Li et al. 2024, SnapKV, arXiv:2404.14469).

    Scores as kvpress's SnapKVPress: the causal softmax of the last
    `window_size` queries over all tokens, restricted to the tokens before the
    window, averaged over the window's queries, smoothed by average pooling of
    width `kernel_size` (stride 1, zero padding counted in the mean), averaged
    over the query heads of each kv-head; the window's own tokens score above
    everything (max + 1), so they stay whenever the budget can hold them.

    Differences from kvpress: with fewer than `window_size` queries (or tokens)
    the window shrinks to what is there instead of failing an assertion; a
    budget smaller than the window keeps an arbitrary (but deterministic) part
    of the window, as kvpress's top-k does. The SnapKV authors' code sums the
    window instead of averaging it and scores each query head: the ranking is
    the same up to the GQA averaging kvpress (and kvengine) add.
    """

    window_size: int = 64
    kernel_size: int = 5
    #: Name in error messages (subclasses override it).
    press_name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.press_name
        check_int(name, "window_size", self.window_size, 1)
        check_int(name, "kernel_size", self.kernel_size, 1)
        if self.kernel_size % 2 == 0:
            # Padding kernel_size // 2 keeps the length only for odd kernels (kvpress would fail later).
            raise InvalidRequestError(f"{name}: kernel_size must be odd, got {self.kernel_size}")

    @property
    def reserved_tokens(self) -> int:
        return self.window_size

    def score(self, inp: PressInput) -> torch.Tensor:
        num_tokens = inp.num_tokens
        window = min(self.window_size, inp.queries.shape[1], num_tokens)
        if window >= num_tokens:
            return torch.ones(inp.num_kv_heads, num_tokens, device=inp.keys.device)
        attn = inp.window_attention(window)[:, :, : num_tokens - window]  # (H_q, w, T - w)
        scores = attn.mean(1)  # (H_q, T - w)
        pad = self.kernel_size // 2
        scores = F.avg_pool1d(scores, kernel_size=self.kernel_size, stride=1, padding=pad)
        scores = inp.per_kv_head(scores)  # (H_kv, T - w)
        return protect_last(torch.cat([scores, scores.new_zeros(inp.num_kv_heads, window)], dim=1), window)
