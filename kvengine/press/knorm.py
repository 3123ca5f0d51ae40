"""Knorm press: keeps the keys of smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press


@register_press("knorm")
@dataclass
class KnormPress(ScorePress):
    """Keeps the keys with the smallest L2 norm (Devoto et al. 2024, arXiv:2406.11430).

    Score `-||k||`: low-norm keys tend to draw high attention, so they stay.
    """

    def score(self, inp: PressInput) -> torch.Tensor:
        return -inp.keys.float().norm(dim=-1)  # (H_kv, T)
