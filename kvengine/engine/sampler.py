"""Turns logits into next tokens: greedy, or temperature / top-k / top-p sampling.

Penalties apply first, to greedy and sampled rows alike: the repetition
penalty (transformers' and vLLM's: a seen token's logit divided by it when
positive, multiplied when negative; seen = in the prompt or the output), then
OpenAI's frequency and presence penalties over the output tokens
(`logit - frequency * count - presence * (count > 0)`), then OpenAI's
`logit_bias` is added. Filters then apply in
the order transformers applies them (temperature, top-k, top-p). Each sampled sequence draws from its own `torch.Generator`, so a
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


def penalize(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]
) -> torch.Tensor:
    """`logits` `(V,)` with the penalties and the logit bias of `params` applied (token ids < V)."""
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(output)), dtype=torch.long, device=logits.device)
        picked = logits[seen]
        logits[seen] = torch.where(
            picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty
        )
    if output and (params.frequency_penalty or params.presence_penalty):
        output_ids = torch.tensor(output, device=logits.device)
        counts = torch.bincount(output_ids, minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    if params.logit_bias:
        tokens, biases = zip(*params.logit_bias, strict=True)
        logits[torch.tensor(tokens, device=logits.device)] += torch.tensor(
            biases, dtype=logits.dtype, device=logits.device
        )
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,
) -> list[int]:
    """One token per row of `logits` `(N, V)`, row i under `params[i]`.

    `histories[i]` is row i's (prompt, output) tokens, which penalties need.
    """
    penalized = [i for i, p in enumerate(params) if p.penalized]
    if penalized:
        if histories is None:
            raise ValueError("penalties need each row's prompt and output tokens")
        logits = logits.clone()
        for i in penalized:
            logits[i] = penalize(logits[i], params[i], *histories[i])
    greedy = logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy or p.temperature < MIN_TEMPERATURE:
            tokens.append(greedy[row])
            continue
        probs = filter_logits(logits[row], p).softmax(-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=gen)))
    return tokens
