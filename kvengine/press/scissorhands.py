"""Scissorhands press: tokens that kept drawing attention over a history window of queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvengine.press.attention import check_int, protect_last
from kvengine.press.base import PressInput, ScorePress, num_kept
from kvengine.press.registry import register_press


@register_press("scissorhands")
@dataclass
class ScissorhandsPress(ScorePress):
    """Keeps pivotal tokens by persistence of importance (Liu et al. 2023, Scissorhands, arXiv:2305.17118).

    The paper's compression step at prefill: each of the last `history_window`
    queries marks the tokens it sees whose attention falls below the average
    `1 / (tokens it sees)`; tokens marked least often are pivotal and stay,
    after the `n_recent` most recent tokens, which always stay (capped at the
    budget). Ties in the count go to the larger attention summed over the
    history window. With GQA the counts (and sums) of the query heads of a
    kv-head are added, so the kv-heads of a layer keep different tokens.

    kvpress has no Scissorhands press. Differences from the paper: it drops
    tokens during decoding, `m` at a time whenever the cache reaches its
    budget; here the whole prompt is compressed once, and a token inside the
    history window is judged only by the queries that can see it. The
    defaults are kvengine's (a window of 64, like SnapKV's).
    """

    history_window: int = 64
    n_recent: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("scissorhands", "history_window", self.history_window, 1)
        check_int("scissorhands", "n_recent", self.n_recent, 0)

    def score(self, inp: PressInput) -> torch.Tensor:
        num_tokens = inp.num_tokens
        window = min(self.history_window, inp.queries.shape[1])
        attn = inp.window_attention(window).double()  # (H_q, w, T)
        q_pos = torch.arange(num_tokens - window, num_tokens, device=attn.device)
        seen = torch.arange(num_tokens, device=attn.device)[None, :] <= q_pos[:, None]  # (w, T)
        average = 1.0 / (q_pos + 1).double()  # (w,) uniform attention of each query
        low = (attn < average[None, :, None]) & seen  # (H_q, w, T)
        group = inp.group_size
        count = low.sum(1).double().view(inp.num_kv_heads, group, num_tokens).sum(1)  # (H_kv, T)
        mass = attn.sum(1).view(inp.num_kv_heads, group, num_tokens).sum(1)  # (H_kv, T)
        # Counts are integers and mass / (group * window + 1) lies in [0, 1): the sum sorts by
        # the count first, then by the mass, exactly (float64 holds both).
        scores = -count + mass / (group * window + 1)
        return protect_last(scores, min(self.n_recent, num_kept(num_tokens, self.ratio)))
