"""Random press: uniformly random scores, the baseline any real press must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press


@register_press("random")
@dataclass
class RandomPress(ScorePress):
    """Keeps a uniformly random subset of each head's tokens (baseline, as kvpress's RandomPress).

    Deterministic: the scores depend only on `seed`, the layer and the input's
    shape, so the same seed and input give the same selection. Unlike kvpress,
    whose fixed seed draws the same pattern at every layer, the layer index is
    mixed into the seed, so layers drop independent subsets.
    """

    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidRequestError(f"random press: seed must be an integer >= 0, got {self.seed!r}")

    def score(self, inp: PressInput) -> torch.Tensor:
        # Drawn on the host: the same selection on every device.
        generator = torch.Generator(device="cpu").manual_seed(self.seed * inp.num_layers + inp.layer)
        # float32 whatever the cache dtype: bf16 draws tie too often for a fair top-k.
        scores = torch.rand(inp.num_kv_heads, inp.num_tokens, generator=generator, device="cpu")  # (H_kv, T)
        return scores.to(inp.keys.device)
