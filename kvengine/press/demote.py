"""Demote press: a score press splits tokens into full-precision and packed ones, under a byte budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, PressInput, ScorePress, check_ratio, num_kept
from kvengine.press.knorm import KnormPress
from kvengine.press.registry import register_press


@register_press("demote")
@dataclass
class DemotePress(Press):
    """Demote instead of evict (MiKV, Yang et al. 2024, arXiv:2402.18096; ZipCache, arXiv:2405.14256).

    The splitter `press` (any score press; None: knorm) ranks each head's
    tokens; the first `n_sink` tokens and the last `window` always rank first.
    The budget is `1 - ratio` of the uncompressed cache's bytes in the pool's
    dtype (the 16-bit cache when the engine runs in 16 bits): the bytes an
    eviction press at the same ratio holds, so "demote" and "snapkv" at ratio
    r are compared at the same bytes. Under it the best-ranked tokens stay in
    full precision and the rest are kept packed at the cache's `kv_bits`
    instead of evicted; only when demoting every other token still exceeds
    the budget are the worst-ranked evicted (`kvengine/cache/demote.py` has
    the plan and the storage). `ratio` 0 with a wrapped press takes that
    press's ratio, so the spec "demote:snapkv" at ratio r is demote at r.

    On a cache without packed blocks (kv_bits 0) there is nowhere to demote
    to: `keep` is what runs, and it keeps the `num_kept(T, ratio)`
    best-ranked tokens (sinks and window first), an eviction at the same
    bytes.
    """

    ratio: float = 0.0
    press: ScorePress | None = None
    n_sink: int = 4
    window: int = 16

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if self.press is not None and not isinstance(self.press, ScorePress):
            raise InvalidRequestError(
                f"demote splits with a score press (one that implements score()), got {type(self.press).__name__}"
            )
        if self.press is not None and self.ratio == 0.0:
            self.ratio = self.press.ratio
        for name in ("n_sink", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"demote: {name} must be an integer >= 0, got {value!r}")

    @property
    def splitter(self) -> ScorePress:
        return self.press if self.press is not None else KnormPress()

    @property
    def budget_fraction(self) -> float:
        """The budget as a fraction of the uncompressed cache's bytes: `1 - ratio`."""
        return 1.0 - self.ratio

    @property
    def reserved_tokens(self) -> int:
        return self.n_sink + self.window

    def validate(self, num_tokens: int, num_layers: int) -> None:
        held = num_kept(num_tokens, self.ratio)
        reserved = min(self.reserved_tokens, num_tokens)
        if reserved > held:
            raise InvalidRequestError(
                f"demote: a budget of {self.budget_fraction:g} of {num_tokens} tokens holds {held} tokens in "
                f"full precision, fewer than the {reserved} that n_sink={self.n_sink} and "
                f"window={self.window} need; raise the budget (lower the ratio) or lower n_sink / window"
            )

    def ranking(self, inp: PressInput) -> torch.Tensor:
        """Scores `(H_kv, T)` of the splitter, with the sinks and the window at +inf."""
        scores = self.splitter.score(inp).float().clone()  # (H_kv, T)
        scores[:, : self.n_sink] = float("inf")
        if self.window:
            scores[:, -self.window :] = float("inf")
        return scores

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        n = num_kept(inp.num_tokens, self.ratio)
        order = self.ranking(inp).argsort(dim=1, descending=True, stable=True)
        return list(order[:, :n].sort(dim=1).values)


def is_demote_spec(spec: str) -> bool:
    """Whether a press spec ("demote", "demote:snapkv") names a demote press."""
    return spec.split(":")[0].strip() == "demote"
