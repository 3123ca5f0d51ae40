"""Log-probabilities of tokens as the model gives them, before any sampling control.

A `Logprob` is read from `log_softmax` of the float32 logits of one position,
taken before temperature, top-k and top-p are applied (as vLLM does by
default): it scores the model, not the sampler, so a greedy and a sampled
request see the same numbers. The engine records one per generated token
(`SamplingParams.logprobs`) and one per prompt token after the first
(`SamplingParams.prompt_logprobs`: the token at i + 1 given the logits at i).
It knows nothing of text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the most alternatives a request may ask for per token (OpenAI's chat limit)


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability and the `k` most likely tokens at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[Logprob]:
    """The log-probability of `token_ids[i]` under row i of `logits` `(R, V)`, with its row's best `num_top`."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(token_ids, device=logp.device)[:, None])[:, 0].tolist()
    num_top = min(num_top, logp.shape[-1])
    if num_top == 0:
        return [Logprob(t, lp) for t, lp in zip(token_ids, chosen, strict=True)]
    values, indices = torch.topk(logp, num_top, dim=-1)
    tops = [tuple(zip(i, v, strict=True)) for i, v in zip(indices.tolist(), values.tolist(), strict=True)]
    return [Logprob(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops, strict=True)]
