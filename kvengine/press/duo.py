"""`duo`: retrieval heads keep their whole cache, streaming heads keep sinks and a recent window.

After DuoAttention (Xiao et al. 2024, arXiv:2410.10819) and RazorAttention
(Tang et al. 2024, arXiv:2407.15891), training-free: which (layer, kv-head)
retrieves is read from a per-model head map, the scores of an
induction/copy probe (`head_probe.py`, cached per model). The budget is the
cache's: at `ratio` the method frees that fraction of the context's tokens,
over all layers and heads, by turning the fewest, lowest-scored heads into
streaming heads. Heads keep different numbers of tokens and the cache frees
the rest for real, head by head (`PagedKVCache.retain`).

Not a per-layer press (layers keep different amounts), so it is registered
among the methods (`methods.py`); `for_model` binds the head map and gives
the `Press` an engine compresses with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press, PressInput, check_ratio
from kvengine.press.methods import register_method

if TYPE_CHECKING:
    from kvengine.models import LoadedModel


@register_method("duo")
@dataclass
class DuoAttention(Press):
    """Full cache for retrieval heads, `n_sink` + `window` tokens for streaming heads (arXiv:2410.10819).

    `head_scores` `[layer][kv_head]`: higher retrieves more (None until bound
    with `for_model`). At `ratio`, the lowest-scored heads stream, as few as
    free `ratio` of the tokens of all heads together.
    """

    ratio: float = 0.0
    n_sink: int = 4
    window: int = 64
    head_scores: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        for name in ("n_sink", "window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidRequestError(f"duo: {name} must be an integer >= 0, got {value!r}")
        if self.n_sink + self.window < 1:
            raise InvalidRequestError("duo: streaming heads must keep something (n_sink + window >= 1)")

    def for_model(self, model: LoadedModel) -> DuoAttention:
        """This method with `model`'s head map (probed once per model, then read from the cache)."""
        from kvengine.press.head_probe import head_scores

        scores = head_scores(model)
        return dataclasses.replace(self, head_scores=tuple(tuple(row) for row in scores.tolist()))

    @property
    def reserved_tokens(self) -> int:
        return self.n_sink + self.window

    def num_streaming(self, num_tokens: int, num_heads: int) -> int:
        """Streaming heads (of `num_heads` in all) that free `ratio` of `num_tokens` tokens per head."""
        freed_per_head = num_tokens - self.reserved_tokens
        if self.ratio == 0.0 or freed_per_head <= 0:
            return 0
        return math.ceil(self.ratio * num_tokens * num_heads / freed_per_head - 1e-9)

    def validate(self, num_tokens: int, num_layers: int) -> None:
        if self.head_scores is None:
            raise InvalidRequestError("duo needs the model's head map: bind it with for_model(model)")
        if len(self.head_scores) != num_layers:
            raise InvalidRequestError(
                f"duo: the head map has {len(self.head_scores)} layers, the model {num_layers}"
            )
        num_heads = sum(len(row) for row in self.head_scores)
        needed = self.num_streaming(num_tokens, num_heads)
        if needed > num_heads or (self.ratio > 0 and num_tokens <= self.reserved_tokens):
            raise InvalidRequestError(
                f"duo: ratio {self.ratio} is out of reach at {num_tokens} tokens: even with all {num_heads} "
                f"heads streaming, each keeps {self.reserved_tokens} (n_sink {self.n_sink} + window "
                f"{self.window}); lower the ratio, n_sink or window"
            )

    def streaming_heads(self, num_tokens: int) -> torch.Tensor:
        """Boolean `(L, H_kv)`: the heads that keep only sinks and the window at `num_tokens`."""
        assert self.head_scores is not None
        scores = torch.tensor(self.head_scores, dtype=torch.float64, device="cpu")
        n = self.num_streaming(num_tokens, scores.numel())
        order = torch.sort(scores.flatten(), stable=True).indices[:n]  # lowest scores stream
        streaming = torch.zeros(scores.numel(), dtype=torch.bool, device="cpu")
        streaming[order] = True
        return streaming.view(scores.shape)

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        self.validate(inp.num_tokens, inp.num_layers)
        assert self.head_scores is not None
        if len(self.head_scores[inp.layer]) != inp.num_kv_heads:
            raise InvalidRequestError(
                f"duo: the head map has {len(self.head_scores[inp.layer])} kv-heads in layer {inp.layer}, "
                f"the model {inp.num_kv_heads}"
            )
        t, device = inp.num_tokens, inp.keys.device
        everything = torch.arange(t, device=device)
        window = torch.cat(
            [
                torch.arange(min(self.n_sink, t), device=device),
                torch.arange(max(self.n_sink, t - self.window), t, device=device),
            ]
        )
        streaming = self.streaming_heads(t)[inp.layer]
        return [window if stream else everything for stream in streaming.tolist()]
