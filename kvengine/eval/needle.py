"""A needle-in-a-haystack task, generated from a seed and the model's tokenizer.

The haystack is a town's yearly records (the demo's document); the needle
is one sentence giving a 6-digit access code, placed at a chosen depth. The
question asks for the code. Nothing is downloaded.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvengine.models import LoadedModel

_PLACES = ["the mill", "the harbour", "the old bridge", "the library", "the market", "the school"]
_EVENTS = [
    "repainted its doors",
    "held a spring fair",
    "hired two new keepers",
    "was closed for repairs",
    "opened a reading room",
    "planted a row of linden trees",
]
QUESTION = "What is the access code of the archive room? Answer with the code only."


@dataclass(frozen=True)
class NeedleExample:
    context: str
    question: str
    answer: str
    needle: str  # the sentence that holds the answer
    depth: float  # where the needle sits, as a fraction of the context
    num_tokens: int  # tokens of the context
    target_tokens: int  # tokens asked for (num_tokens is within one sentence below it)


def make_needle_example(model: LoadedModel, num_tokens: int, depth: float, seed: int) -> NeedleExample:
    """A haystack of about `num_tokens` tokens (within a sentence) with the needle at `depth`."""
    if model.tokenizer is None:
        raise ValueError("the needle task needs a model with a tokenizer")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    answer = str(rng.randrange(100_000, 1_000_000))
    needle = f"The access code of the archive room is {answer}."
    budget = num_tokens - len(model.tokenizer.encode(needle))
    sentences: list[str] = []
    year, used = 1700 + rng.randrange(100), 0
    while True:
        sentence = f"In {year}, {rng.choice(_PLACES)} {rng.choice(_EVENTS)}."
        cost = len(model.tokenizer.encode(" " + sentence))
        if used + cost > budget:
            break
        sentences.append(sentence)
        used, year = used + cost, year + 1
    sentences.insert(round(depth * len(sentences)), needle)
    context = " ".join(sentences)
    return NeedleExample(
        context, QUESTION, answer, needle, depth, len(model.tokenizer.encode(context)), num_tokens
    )


def is_correct(example: NeedleExample, output: str) -> bool:
    return example.answer in output
