"""TOVA press: the attention of the last query, averaged over heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.press.attention import protect_last
from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press


@register_press("tova")
@dataclass
class TOVAPress(ScorePress):
    """Keeps the tokens the last query attends to most (Oren et al. 2024, TOVA, arXiv:2401.06104).

    As kvpress's TOVAPress: the last query's causal softmax, averaged over
    all query heads of the layer, scores every earlier token; the last token
    itself always stays (max + 1, a slight difference from TOVA noted by
    kvpress). Because of the average over heads every kv-head of a layer
    keeps the same tokens.
    """

    def score(self, inp: PressInput) -> torch.Tensor:
        num_tokens = inp.num_tokens
        last = inp.window_attention(1)[:, 0, : num_tokens - 1]  # (H_q, T - 1)
        scores = last.mean(0, keepdim=True).expand(inp.num_kv_heads, -1)  # (H_kv, T - 1)
        padded = torch.cat([scores, scores.new_zeros(inp.num_kv_heads, 1)], dim=1)  # (H_kv, T)
        return protect_last(padded, 1)
