"""H2O press: heavy hitters by accumulated attention, plus the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.press.attention import accumulated_attention, check_int, protect_last
from kvengine.press.base import PressInput, ScorePress, num_kept
from kvengine.press.registry import register_press


@register_press("h2o")
@dataclass
class H2OPress(ScorePress):
    """Keeps a recent window and the heavy hitters (Zhang et al. 2023, H2O, arXiv:2306.14048).

    A head's budget `num_kept(T, ratio)` holds the `n_recent` most recent
    tokens and, from the older ones, those with the largest attention summed
    over every query the press is shown (all prompt queries at prefill; with
    `T_q < T`, only the last `T_q`). `n_recent=None` splits the budget half
    and half (the paper's setting: heavy ratio = recent ratio), the odd token
    going to the heavy hitters; a fixed `n_recent` larger than the budget
    leaves only the most recent `budget` tokens.

    The scores are the raw column sums as in the authors' real-drop code (no
    division by how many queries saw a token, unlike kvpress's
    ObservedAttentionPress, its nearest press: kvpress has no H2O press). With
    GQA the query heads of a kv-head are averaged, so the kv-heads of a layer
    keep different tokens.
    """

    n_recent: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_recent is not None:
            check_int("h2o", "n_recent", self.n_recent, 0)

    def recent_len(self, num_tokens: int) -> int:
        """How many of the most recent tokens stay unconditionally at `num_tokens` tokens."""
        budget = num_kept(num_tokens, self.ratio)
        return budget // 2 if self.n_recent is None else min(self.n_recent, budget)

    def score(self, inp: PressInput) -> torch.Tensor:
        heavy = inp.per_kv_head(accumulated_attention(inp))  # (H_kv, T)
        return protect_last(heavy, self.recent_len(inp.num_tokens))
