"""AdaKV: one layer budget shared unevenly across kv-heads by a global top-k."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, PressInput, ScorePress, check_ratio, num_kept
from kvengine.press.registry import register_press


@register_press("adakv")
@dataclass
class AdaKV(Press):
    """Head-wise budgets over a score press (Feng et al. 2024, arXiv:2407.11550).

    Keeps the layer's `H_kv * num_kept(T, ratio)` best-scored tokens across all
    kv-heads, so heads whose scores are concentrated give budget to heads whose
    scores are spread out. Each head first keeps its `int(alpha_safeguard *
    num_kept(T, ratio))` best tokens, whatever the other heads score (as
    kvpress's AdaKVPress). Returns per-head index tensors of different lengths
    whose total is exactly the layer budget; unlike kvpress, which masks the
    evicted tokens, the cache frees them.

    `ratio` is the wrapped press's. The scores are compared across heads, so
    they should be on one scale (attention-like probabilities are; norms are
    too within one layer).
    """

    press: ScorePress
    alpha_safeguard: float = 0.20

    def __post_init__(self) -> None:
        if not isinstance(self.press, ScorePress):
            raise InvalidRequestError(
                f"adakv wraps a score press (one that implements score()), got {type(self.press).__name__}"
            )
        alpha = self.alpha_safeguard
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            raise InvalidRequestError(f"adakv: alpha_safeguard must be in [0, 1], got {alpha!r}")

    @property
    def ratio(self) -> float:
        return self.press.ratio

    @ratio.setter
    def ratio(self, value: float) -> None:
        check_ratio(value)
        self.press.ratio = value

    @property
    def reserved_tokens(self) -> int:
        return self.press.reserved_tokens

    def validate(self, num_tokens: int, num_layers: int) -> None:
        self.press.validate(num_tokens, num_layers)

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        num_heads, num_tokens = inp.num_kv_heads, inp.num_tokens
        per_head = num_kept(num_tokens, self.ratio)
        if per_head >= num_tokens:
            return [torch.arange(num_tokens, device=inp.keys.device) for _ in range(num_heads)]
        scores = self.press.score(inp).float()  # (H_kv, T)
        num_safe = int(per_head * self.alpha_safeguard)
        kept = torch.zeros(num_heads, num_tokens, dtype=torch.bool, device=scores.device)  # (H_kv, T)
        kept.scatter_(1, scores.topk(num_safe, dim=1).indices, True)
        # The rest of the budget goes to the best tokens not yet kept, of any head. Selecting
        # among the unprotected entries (rather than raising the protected scores) stays exact
        # when a press scores some tokens +inf.
        free = (~kept).flatten().nonzero().squeeze(1)  # (H_kv * T - H_kv * num_safe,)
        best = scores.flatten()[free].topk(num_heads * (per_head - num_safe)).indices
        kept.view(-1)[free[best]] = True
        return [row.nonzero().squeeze(1) for row in kept]
