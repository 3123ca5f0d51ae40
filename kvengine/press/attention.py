"""Shared pieces of the presses that read attention weights (H2O, Scissorhands, SnapKV, PyramidKV, TOVA).

`accumulated_attention` is the column sum of the causal softmax of every
query a press is shown, computed a chunk of queries at a time so that the full
`(H_q, T, T)` matrix never exists. `protect_last` gives the most recent tokens
a score above every other (kvpress's way of keeping an observation window).
The presses' windows of recent queries use `PressInput.window_attention`.
"""

from __future__ import annotations

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import PressInput


def accumulated_attention(inp: PressInput, chunk: int = 256) -> torch.Tensor:
    """Attention each cached token receives, summed over all available queries: `(H_q, T)` float32.

    Query `i` of the `T_q` queries sits at position `T - T_q + i` and attends
    causally to tokens `0..T - T_q + i` with softmax scale `inp.scaling`.
    Peak memory is `H_q * chunk * T` floats whatever the prompt length.
    """
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    num_tokens, num_queries = inp.num_tokens, inp.queries.shape[1]
    num_kv_heads, group = inp.num_kv_heads, inp.group_size
    head_dim = inp.keys.shape[-1]
    first = num_tokens - num_queries  # position of the first query
    keys = inp.keys.float()  # (H_kv, T, D)
    total = torch.zeros(inp.queries.shape[0], num_tokens, device=inp.keys.device)  # (H_q, T)
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        # Keys after the chunk's last query are masked for every query in it: leave them out.
        visible = first + stop
        q = inp.queries[:, start:stop].float()  # (H_q, c, D)
        # Query heads of one kv-head share its keys: multiply by group instead of repeating keys.
        q = q.reshape(num_kv_heads, group * (stop - start), head_dim)  # (H_kv, g*c, D)
        scores = (q @ keys[:, :visible].transpose(1, 2)).view(-1, stop - start, visible)  # (H_q, c, V)
        q_pos = first + torch.arange(start, stop, device=keys.device)
        future = torch.arange(visible, device=keys.device)[None, :] > q_pos[:, None]  # (c, V)
        weights = (scores * inp.scaling).masked_fill(future, float("-inf")).softmax(-1)
        total[:, :visible] += weights.sum(1)
    return total


def protect_last(scores: torch.Tensor, num_last: int) -> torch.Tensor:
    """`scores` `(H, T)` with the last `num_last` columns set above every other score.

    As kvpress pads its observation window: the protected value is the maximum
    of the other scores (over all heads) plus 1, so a top-k that keeps at
    least `num_last` tokens keeps all of them. With nothing left to compare,
    every score is 1.
    """
    num_tokens = scores.shape[-1]
    if num_last <= 0:
        return scores
    if num_last >= num_tokens:
        return torch.ones_like(scores)
    out = scores.clone()
    out[:, num_tokens - num_last :] = scores[:, : num_tokens - num_last].max() + 1
    return out


def check_int(press: str, name: str, value: object, minimum: int) -> None:
    """Raise InvalidRequestError unless `value` is an integer >= `minimum` (a press hyperparameter)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{press}: {name} must be an integer >= {minimum}, got {value!r}")
