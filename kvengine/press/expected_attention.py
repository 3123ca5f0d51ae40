"""Expected Attention press: the attention future queries are expected to pay each key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvengine.errors import InvalidRequestError
from kvengine.press.base import PressInput, ScorePress
from kvengine.press.registry import register_press

Rope = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` on the last dim (transformers' Llama RoPE convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo `x * cos + rotate_half(x) * sin` (cos/sin `(N, D)` broadcast over `x` `(..., N, D)`).

    Exact for a scaled rotation too (RoPE variants multiply cos and sin by an
    attention factor): each pair is divided by `cos^2 + sin^2`.
    """
    return (x * cos - rotate_half(x) * sin) / (cos * cos + sin * sin)


def mean_rotation(rope: Rope, positions: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The RoPE map averaged over `positions` `(N,)`, as a matrix `R` `(D, D)`: `R @ q`."""
    cos, sin = (t.float().mean(0) for t in rope(positions))  # (D,) each
    eye = torch.eye(head_dim, device=cos.device)
    # Row j is RoPE applied to the basis vector e_j, i.e. column j of R.
    return (eye * cos + rotate_half(eye) * sin).T


@register_press("expected_attention")
@dataclass
class ExpectedAttentionPress(ScorePress):
    """Keeps the keys future queries are expected to attend to most (Devoto et al. 2025, arXiv:2510.00636).

    As kvpress's ExpectedAttentionPress: the queries of the prompt (before
    RoPE, sinks left out) are modelled as a Gaussian with mean `mu` and
    covariance `S`; the RoPE rotation averaged over the next
    `n_future_positions` positions, `R`, moves them to the future; for a
    Gaussian query, `E[exp(s q.k)] = exp(s (R mu).k + s^2/2 k^T R S R^T k)`.
    These logits are softmaxed over the non-sink keys, averaged over the query
    heads of each kv-head, rescaled by `(p + epsilon) * ||v||`, and the first
    `n_sink` tokens are given a score above all others so they stay.

    Differences from kvpress, each forced by what a press sees here:
    - kvpress projects the layer's hidden states with `q_proj`; here the
      engine's post-RoPE queries are un-rotated with `rope` at their positions
      (the same pre-RoPE quantity, QK-norm included) -- for every prompt token
      whose query is given (the last `T_q`; all of them at prefill).
    - future positions follow `positions[-1]`, not the chunk length, so they
      stay right when the cache does not start at position 0.
    - the model's `scaling` replaces kvpress's fixed `1/sqrt(d)` (and `1/d`
      for the covariance term); the two agree for Llama-style models.
    - all of it runs in float32 whatever the cache dtype.
    - with no token beyond the sinks, all scores are equal (kvpress asserts).
    """

    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "expected_attention"
        for field, low in (("n_future_positions", 1), ("n_sink", 0)):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidRequestError(f"{name}: {field} must be an integer >= {low}, got {value!r}")
        for field in ("use_covariance", "use_vnorm"):
            if not isinstance(getattr(self, field), bool):
                raise InvalidRequestError(
                    f"{name}: {field} must be True or False, got {getattr(self, field)!r}"
                )
        eps = self.epsilon
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0.0 <= eps < float("inf"):
            raise InvalidRequestError(f"{name}: epsilon must be a finite number >= 0, got {eps!r}")

    @property
    def reserved_tokens(self) -> int:
        return self.n_sink

    def score(self, inp: PressInput) -> torch.Tensor:
        num_tokens, num_sink = inp.num_tokens, min(self.n_sink, inp.num_tokens)
        if num_sink == num_tokens:
            return torch.ones(inp.num_kv_heads, num_tokens, device=inp.keys.device)
        mean, cov = self.future_query_stats(inp)  # (H_q, D), (H_q, D, D) or None
        keys = inp.keys[:, num_sink:].float().repeat_interleave(inp.group_size, dim=0)  # (H_q, T', D)
        logits = (keys @ mean.unsqueeze(-1)).squeeze(-1) * inp.scaling  # (H_q, T')
        if cov is not None:
            logits += 0.5 * inp.scaling**2 * ((keys @ cov) * keys).sum(-1)
        scores = inp.per_kv_head(logits.softmax(dim=-1))  # (H_kv, T')
        if self.use_vnorm:
            scores = (scores + self.epsilon) * inp.values[:, num_sink:].float().norm(dim=-1)
        sinks = (scores.max() + 1).expand(inp.num_kv_heads, num_sink)  # (H_kv, n_sink)
        return torch.cat([sinks, scores], dim=1)  # (H_kv, T)

    def future_query_stats(self, inp: PressInput) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean `(H_q, D)` and covariance `(H_q, D, D)` (None without `use_covariance`) of the
        pre-RoPE prompt queries, moved by the RoPE rotation averaged over the next positions."""
        if inp.rope is None or inp.positions is None:
            raise InvalidRequestError(
                "expected_attention needs the model's rotary embedding and token positions "
                "(PressInput.rope and .positions); this model or engine path gives none"
            )
        num_tokens, head_dim = inp.num_tokens, inp.keys.shape[-1]
        num_queries = inp.queries.shape[1]
        cos, sin = (t.float() for t in inp.rope(inp.positions[num_tokens - num_queries :]))  # (T_q, D)
        if cos.shape[-1] != head_dim:
            raise InvalidRequestError(
                f"expected_attention: rotary dim {cos.shape[-1]} != head dim {head_dim} "
                "(partial RoPE is not supported)"
            )
        queries = unrotate(inp.queries.float(), cos, sin)  # (H_q, T_q, D)
        # Sink tokens' queries are outliers too; kvpress leaves them out of the statistics.
        queries = queries[:, max(0, self.n_sink - (num_tokens - num_queries)) :]
        mean = queries.mean(dim=1)  # (H_q, D)
        future = inp.positions[-1] + 1 + torch.arange(self.n_future_positions, device=inp.positions.device)
        rot = mean_rotation(inp.rope, future, head_dim)  # (D, D)
        if not self.use_covariance:
            return mean @ rot.T, None
        centered = queries - mean.unsqueeze(1)
        cov = centered.transpose(1, 2) @ centered / queries.shape[1]  # (H_q, D, D)
        return mean @ rot.T, rot @ cov @ rot.T
