"""KeyDiff press: keeps the keys that differ most from the head's average key direction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press


@register_press("keydiff")
@dataclass
class KeyDiffPress(ScorePress):
    """Keeps the keys least similar to the head's mean key (Park et al. 2025, arXiv:2504.15364).

    As kvpress's KeyDiffPress: the anchor is the mean of the unit-normalized
    keys of the head, and the score is minus the cosine similarity to it. The
    paper evicts block by block while the prompt streams in; like kvpress, this
    press scores the whole prompt at once.
    """

    def score(self, inp: PressInput) -> torch.Tensor:
        keys = inp.keys.float()  # (H_kv, T, D)
        anchor = F.normalize(keys, p=2, dim=-1).mean(dim=1, keepdim=True)  # (H_kv, 1, D)
        return -F.cosine_similarity(keys, anchor, dim=-1)  # (H_kv, T)
