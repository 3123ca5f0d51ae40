"""Labelled prompts for the semantic cache: paraphrases and near misses, generated from templates.

Each `Intent` is one question with slots (a country, a number, a person) and
several phrasings of it. A prompt's *answer key* is its intent and slot
values: two prompts deserve the same answer exactly when their keys are
equal. `make_pairs` draws paraphrase pairs (same key, different phrasing),
hard negatives (same phrasing, one slot value changed: "capital of France"
vs "capital of Spain", "12 miles" vs "13 miles") and easy negatives
(another intent); `make_stream` draws a sequence of prompts in which many
keys come back in other words, for replaying through a cache.

This module only makes text; it knows nothing of embeddings or caches. The
text is written for this project (no data set is downloaded).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

_COUNTRIES = [
    "France", "Spain", "Italy", "Germany", "Portugal", "Austria", "Poland", "Norway", "Sweden",
    "Finland", "Greece", "Japan", "Kenya", "Peru", "Chile", "Canada", "Egypt", "India",
]  # fmt: skip
_PEOPLE = [
    "Marie Curie", "Isaac Newton", "Ada Lovelace", "Alan Turing", "Charles Darwin", "Nikola Tesla",
    "Jane Austen", "Leo Tolstoy", "Rosalind Franklin", "Galileo Galilei", "Emmy Noether", "Louis Pasteur",
]  # fmt: skip
_FOODS = ["an apple", "a banana", "an egg", "a slice of bread", "a cup of rice", "a carrot", "an orange"]
_LANGS = ["Python", "Rust", "Go", "Java", "JavaScript", "C++", "Haskell"]
_TASKS = [
    "reverse a list",
    "sort a dictionary by value",
    "read a file line by line",
    "remove duplicates from a list",
]
_NUMBERS = [str(n) for n in (3, 5, 7, 12, 13, 20, 25, 40, 42, 64, 99, 100, 150, 365)]


@dataclass(frozen=True)
class Intent:
    """One question: its name, its slots' value lists, and phrasings using `{slot}` placeholders."""

    name: str
    slots: dict[str, list[str]]
    phrasings: tuple[str, ...]


INTENTS: tuple[Intent, ...] = (
    Intent("capital", {"c": _COUNTRIES}, (
        "What is the capital of {c}?",
        "Which city is the capital of {c}?",
        "Tell me the capital city of {c}.",
        "Name the capital of {c}, please.",
    )),
    Intent("population", {"c": _COUNTRIES}, (
        "What is the population of {c}?",
        "How many people live in {c}?",
        "Roughly how many inhabitants does {c} have?",
        "Give me the number of people living in {c}.",
    )),
    Intent("language", {"c": _COUNTRIES}, (
        "What language do people speak in {c}?",
        "Which language is spoken in {c}?",
        "What is the official language of {c}?",
        "In {c}, what language do most people speak?",
    )),
    Intent("born", {"p": _PEOPLE}, (
        "When was {p} born?",
        "In what year was {p} born?",
        "What is the birth year of {p}?",
        "Tell me the year {p} was born.",
    )),
    Intent("known_for", {"p": _PEOPLE}, (
        "What is {p} famous for?",
        "Why is {p} well known?",
        "What did {p} become known for?",
        "Summarize what {p} is remembered for.",
    )),
    Intent("miles_km", {"n": _NUMBERS}, (
        "Convert {n} miles to kilometers.",
        "How many kilometers are {n} miles?",
        "What is {n} miles in km?",
        "{n} miles equals how many kilometers?",
    )),
    Intent("celsius", {"n": _NUMBERS}, (
        "Convert {n} degrees Celsius to Fahrenheit.",
        "What is {n} °C in Fahrenheit?",
        "How much is {n} degrees Celsius in Fahrenheit?",
        "{n} Celsius is how many degrees Fahrenheit?",
    )),
    Intent("square", {"n": _NUMBERS}, (
        "What is {n} squared?",
        "Compute the square of {n}.",
        "What do you get when you multiply {n} by itself?",
        "Calculate {n} to the power of two.",
    )),
    Intent("calories", {"f": _FOODS}, (
        "How many calories are in {f}?",
        "What is the calorie count of {f}?",
        "How much energy, in calories, does {f} have?",
        "Tell me the calories in {f}.",
    )),
    Intent("code", {"t": _TASKS, "l": _LANGS}, (
        "How do I {t} in {l}?",
        "Show me how to {t} in {l}.",
        "What is the {l} code to {t}?",
        "In {l}, how can I {t}?",
    )),
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    text: str
    key: str  # intent and slot values: equal keys deserve the same answer


@dataclass(frozen=True)
class Pair:
    a: Prompt
    b: Prompt
    kind: str  # "paraphrase", "hard_negative" (one slot changed), "easy_negative" (another intent)

    @property
    def same_answer(self) -> bool:
        return self.a.key == self.b.key


def _prompt(intent: Intent, phrasing: int, values: dict[str, str]) -> Prompt:
    key = intent.name + ":" + "|".join(f"{k}={values[k]}" for k in sorted(values))
    return Prompt(intent.phrasings[phrasing].format(**values), key)


def _values(intent: Intent, rng: random.Random) -> dict[str, str]:
    return {slot: rng.choice(options) for slot, options in intent.slots.items()}


def make_pairs(num_pairs: int, seed: int = 0) -> list[Pair]:
    """`num_pairs` labelled pairs: 40% paraphrases, 40% hard negatives, 20% easy negatives."""
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be at least 1, got {num_pairs}")
    rng = random.Random(seed)
    pairs = []
    for i in range(num_pairs):
        intent = rng.choice(INTENTS)
        values = _values(intent, rng)
        p, q = rng.sample(range(len(intent.phrasings)), 2)
        a = _prompt(intent, p, values)
        if i % 5 in (0, 1):
            pairs.append(Pair(a, _prompt(intent, q, values), "paraphrase"))
        elif i % 5 in (2, 3):
            slot = rng.choice(sorted(values))
            other = dict(values, **{slot: rng.choice([v for v in intent.slots[slot] if v != values[slot]])})
            pairs.append(Pair(a, _prompt(intent, p if rng.random() < 0.5 else q, other), "hard_negative"))
        else:
            other_intent = rng.choice([t for t in INTENTS if t is not intent])
            b = _prompt(other_intent, rng.randrange(len(other_intent.phrasings)), _values(other_intent, rng))
            pairs.append(Pair(a, b, "easy_negative"))
    return pairs


def make_stream(num_prompts: int, num_keys: int, seed: int = 0) -> list[Prompt]:
    """`num_prompts` prompts over `num_keys` answer keys, each prompt a random phrasing of its key.

    Keys are drawn from a skewed (Zipf-like) popularity, as requests to a
    service are; keys sharing an intent differ in one slot, so every key has
    hard negatives in the stream.
    """
    if num_prompts < 1 or num_keys < 1:
        raise ValueError(f"num_prompts and num_keys must be at least 1, got {num_prompts}, {num_keys}")
    rng = random.Random(seed)
    keys: dict[str, tuple[Intent, dict[str, str]]] = {}
    for _ in range(num_keys * 50):
        if len(keys) == num_keys:
            break
        intent = rng.choice(INTENTS)
        values = _values(intent, rng)
        keys.setdefault(_prompt(intent, 0, values).key, (intent, values))
    chosen = list(keys.values())
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(chosen))]
    out = []
    for intent, values in rng.choices(chosen, weights, k=num_prompts):
        out.append(_prompt(intent, rng.randrange(len(intent.phrasings)), values))
    return out
