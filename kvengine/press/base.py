"""The press contract: what a compression method sees and what it returns.

A press looks at one layer of one sequence at a time (`PressInput`: that
layer's cached keys and values, the queries of the prompt's last tokens, and
attention weights on request) and returns, for every kv-head, the indices of
the cached tokens to keep. The engine then moves the kept tokens into dense
blocks and releases the rest (`PagedKVCache.retain`), so what a press evicts is
memory given back to the pool, head by head.

Most presses only score tokens: they subclass `ScorePress` and implement
`score()`; the base turns scores into a per-head top-k under the budget.
Budget wrappers (`AdaKV`: across heads; `PyramidKV`, `PerLayer`: across
layers) wrap a score press and change how many tokens each head keeps.

Presses are pure: they never touch the cache, the scheduler or the model.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvengine.errors import InvalidRequestError


@dataclass
class PressInput:
    """One layer of one sequence, as a press sees it.

    `keys`/`values` `(H_kv, T, D)` are the layer's cached tokens in cache
    order (keys after RoPE). `queries` `(H_q, T_q, D)` are the queries of the
    last `T_q` tokens of the prompt (after RoPE), which are also the last `T_q`
    cached tokens. `scaling` is the model's softmax scale.
    """

    layer: int
    num_layers: int
    keys: torch.Tensor
    values: torch.Tensor
    queries: torch.Tensor
    scaling: float
    # RoPE position of each cached token `(T,)`, and the model's rotary embedding as a
    # function of positions `(N,)` -> `(cos, sin)`, each `(N, D)` (for presses that
    # reason about future queries, such as Expected Attention).
    positions: torch.Tensor | None = None
    rope: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def group_size(self) -> int:
        """Query heads per kv-head."""
        return self.queries.shape[0] // self.keys.shape[0]

    def window_attention(self, window: int) -> torch.Tensor:
        """Causal attention weights `(H_q, w, T)` of the last `w` queries (w <= T_q).

        Computed in float32 once per window size and cached for other presses.
        """
        window = min(window, self.queries.shape[1])
        if window not in self._cache:
            q = self.queries[:, -window:].float()
            k = self.keys.float().repeat_interleave(self.group_size, dim=0)
            scores = q @ k.transpose(1, 2) * self.scaling  # (H_q, w, T)
            q_pos = self.num_tokens - window + torch.arange(window, device=q.device)
            future = torch.arange(self.num_tokens, device=q.device)[None, :] > q_pos[:, None]
            self._cache[window] = scores.masked_fill(future, float("-inf")).softmax(-1)
        return self._cache[window]

    def per_kv_head(self, per_query_head: torch.Tensor) -> torch.Tensor:
        """Average `(H_q, ...)` over the query heads of each kv-head -> `(H_kv, ...)`."""
        return per_query_head.view(self.num_kv_heads, self.group_size, *per_query_head.shape[1:]).mean(1)


class Press(ABC):
    """Decides which cached tokens each kv-head of a layer keeps.

    Subclasses are dataclasses whose fields are the hyperparameters, checked
    in `__post_init__`; the class docstring cites the paper.
    """

    #: Tokens each head keeps are at most (1 - ratio) of the context.
    ratio: float

    @abstractmethod
    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        """Indices to keep per kv-head: a list of H_kv sorted int64 tensors into `[0, T)`.

        On any device (the keys' device, usually); the cache moves them to its block tables.
        """

    @property
    def reserved_tokens(self) -> int:
        """Tokens each head keeps whatever the budget (attention sinks, an observation window).

        A decoding-time budget must leave room besides them. Presses that have
        such tokens override this; wrappers forward their inner press's.
        """
        return 0

    def validate(self, num_tokens: int, num_layers: int) -> None:
        """Raise InvalidRequestError if this press cannot compress a context of `num_tokens`.

        Called when a request is added, so that a press never fails inside a
        forward pass shared with other requests. The default accepts anything.
        """
        return None


def with_budget(press: Press, num_tokens: int, budget: int) -> Press:
    """A copy of `press` whose ratio makes each head keep `budget` of `num_tokens` tokens.

    For decoding-time compression, where the budget is a token count. Works
    for presses with a `ratio` field and for wrappers with a `press` field.
    """
    fields = getattr(press, "__dataclass_fields__", {})
    if "ratio" in fields:
        # Half a token of slack so that flooring in num_kept lands on the budget.
        ratio = max(0.0, 1.0 - (budget + 0.5) / num_tokens)
        return dataclasses.replace(press, ratio=ratio)  # type: ignore[type-var]
    if "press" in fields:
        return dataclasses.replace(press, press=with_budget(press.press, num_tokens, budget))  # type: ignore[attr-defined,type-var]
    raise InvalidRequestError(f"{type(press).__name__} cannot keep a fixed token budget while decoding")


def check_ratio(ratio: float) -> None:
    """Raise InvalidRequestError unless 0 <= ratio < 1."""
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0.0 <= ratio < 1.0:
        raise InvalidRequestError(f"compression ratio must be in [0, 1), got {ratio!r}")


def num_kept(num_tokens: int, ratio: float) -> int:
    """Tokens a head keeps of `num_tokens` at `ratio` (as kvpress: floor of the remainder)."""
    return max(1, int(num_tokens * (1.0 - ratio))) if num_tokens else 0


def top_k_per_head(scores: torch.Tensor, k: int | list[int]) -> list[torch.Tensor]:
    """Sorted indices of the `k` (or `k[h]`) highest scores of each row of `scores` `(H, T)`."""
    ks = [k] * scores.shape[0] if isinstance(k, int) else k
    return [
        torch.topk(row, min(n, row.numel())).indices.sort().values for row, n in zip(scores, ks, strict=True)
    ]


@dataclass
class ScorePress(Press):
    """A press that scores every cached token per kv-head; the highest scores stay."""

    ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.ratio)

    @abstractmethod
    def score(self, inp: PressInput) -> torch.Tensor:
        """Scores `(H_kv, T)`: higher means more worth keeping."""

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        n = num_kept(inp.num_tokens, self.ratio)
        if n >= inp.num_tokens:
            return [torch.arange(inp.num_tokens, device=inp.keys.device) for _ in range(inp.num_kv_heads)]
        return top_k_per_head(self.score(inp), n)
