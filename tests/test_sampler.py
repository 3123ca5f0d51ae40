"""Sampling filters against brute force; a seeded row draws what torch.multinomial draws from them."""

from __future__ import annotations

import pytest
import torch

from kvengine.engine.request import SamplingParams
from kvengine.engine.sampler import filter_logits, sample
from kvengine.errors import InvalidRequestError


def brute_force_kept(logits: torch.Tensor, top_k: int, top_p: float) -> set[int]:
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    if top_k:
        order = order[:top_k]
    if top_p >= 1.0:
        return set(order)
    probs = torch.softmax(logits[order], 0).tolist()
    kept, mass = [], 0.0
    for i, p in zip(order, probs, strict=True):
        kept.append(i)
        mass += p
        if mass >= top_p:
            break
    return set(kept)


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (5, 1.0), (0, 0.5), (10, 0.8), (3, 0.99), (1, 1.0)])
def test_filter_keeps_what_brute_force_keeps(top_k: int, top_p: float) -> None:
    torch.manual_seed(0)
    for _ in range(20):
        logits = torch.randn(50) * 3
        filtered = filter_logits(logits, SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p))
        kept = set(torch.nonzero(filtered > float("-inf")).flatten().tolist())
        assert kept == brute_force_kept(logits, top_k, top_p)


def test_temperature_scales_logits() -> None:
    logits = torch.tensor([1.0, 2.0, 4.0])
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    torch.testing.assert_close(out, logits * 2)


def test_greedy_rows_take_the_argmax_and_a_seeded_row_draws_as_torch_does() -> None:
    """A sampled row draws what `torch.multinomial` draws, with its own generator, from the softmax
    of its logits filtered by brute force, whatever else is in the batch (a greedy row, another
    sampled row with its own generator)."""
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1)) * 3
    greedy = SamplingParams()
    hot = SamplingParams(temperature=1.5, top_k=20, top_p=0.9, seed=7)
    other = SamplingParams(temperature=0.8)
    gens = [None, torch.Generator().manual_seed(7), torch.Generator().manual_seed(3)]
    # Reference: the kept tokens by brute force, their softmax at temperature 1.5, seed 7's draws.
    kept = sorted(brute_force_kept(logits[1] / 1.5, 20, 0.9))
    probs = torch.zeros(100)
    probs[kept] = torch.softmax(logits[1, kept] / 1.5, 0)
    reference = torch.Generator().manual_seed(7)
    draws = [sample(logits, [greedy, hot, other], gens) for _ in range(50)]
    assert [d[0] for d in draws] == [int(logits[0].argmax())] * 50
    assert [d[1] for d in draws] == [int(torch.multinomial(probs, 1, generator=reference)) for _ in range(50)]
    assert len({d[1] for d in draws}) > 1  # it did sample: more than one token in 50 draws


def test_sampled_tokens_follow_the_distribution() -> None:
    logits = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    gen = torch.Generator().manual_seed(0)
    p = SamplingParams(temperature=1.0)
    draws = [sample(logits[None], [p], [gen])[0] for _ in range(3000)]
    freq = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    torch.testing.assert_close(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"max_tokens": -3}, "max_tokens must be >= 1"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop strings"),
    ],
)
def test_bad_sampling_parameters_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams(**kwargs)
