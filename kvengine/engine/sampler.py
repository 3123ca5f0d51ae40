"""Turns logits into next tokens: greedy, or temperature / top-k / top-p sampling.

Filters apply in the order transformers applies them (temperature, top-k,
top-p). Each sampled sequence draws from its own `torch.Generator`, so a
seeded request gives the same tokens whatever shares its batch.
"""

from __future__ import annotations

import torch

from kvengine.engine.request import SamplingParams

# Below this temperature, sampling is greedy: dividing by it would overflow float32
# (inf - inf = NaN in the softmax), and its distribution is the argmax's anyway.
MIN_TEMPERATURE = 1e-5


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Scaled logits `(V,)` with tokens outside top-k / top-p set to -inf; the top token always stays."""
    logits = logits / max(params.temperature, MIN_TEMPERATURE)
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = mass_before >= params.top_p
        drop[0] = False  # a top_p below float32's resolution (1e-300 reads as 0) must not drop it
        logits = logits.index_fill(0, order[drop], float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """One token per row of `logits` `(N, V)`, row i under `params[i]`."""
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy or p.temperature < MIN_TEMPERATURE:
            tokens.append(greedy[row])
            continue
        probs = filter_logits(logits[row], p).softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
