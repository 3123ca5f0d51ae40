"""StreamingLLM press: attention sinks plus a window of the most recent tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import PressInput, ScorePress, num_kept
from kvengine.press.registry import register_press


@register_press("streaming_llm")
@dataclass
class StreamingLLMPress(ScorePress):
    """Keeps the first `n_sink` tokens and the most recent ones (Xiao et al. 2023, arXiv:2309.17453).

    The budget `num_kept(T, ratio)` is filled by the `n_sink` sinks and then
    the most recent tokens (as kvpress's StreamingLLMPress; keys are not
    re-rotated to close the gap, as in kvpress without KeyRerotationPress).
    A budget smaller than `n_sink` is an InvalidRequestError: the window would
    be empty and sinks themselves would be dropped.
    """

    n_sink: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.n_sink, bool) or not isinstance(self.n_sink, int) or self.n_sink < 0:
            raise InvalidRequestError(f"streaming_llm: n_sink must be an integer >= 0, got {self.n_sink!r}")

    @property
    def reserved_tokens(self) -> int:
        return self.n_sink

    def score(self, inp: PressInput) -> torch.Tensor:
        num_tokens = inp.num_tokens
        # Recency is the score; sinks rank above every other token, the first sink highest.
        scores = torch.arange(num_tokens, dtype=torch.float32, device=inp.keys.device)  # (T,)
        num_sink = min(self.n_sink, num_tokens)
        scores[:num_sink] = 2 * num_tokens - scores[:num_sink]
        return scores.expand(inp.num_kv_heads, num_tokens)  # (H_kv, T)

    def validate(self, num_tokens: int, num_layers: int) -> None:
        budget = num_kept(num_tokens, self.ratio)
        if budget < num_tokens and self.n_sink > budget:
            raise InvalidRequestError(
                f"streaming_llm: {self.n_sink} sink tokens do not fit in the budget of {budget} tokens "
                f"({num_tokens} tokens at ratio {self.ratio}); lower n_sink or the ratio"
            )

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        self.validate(inp.num_tokens, inp.num_layers)
        return super().keep(inp)
