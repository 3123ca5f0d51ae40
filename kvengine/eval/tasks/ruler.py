"""RULER-style synthetic tasks, generated from a seed and a tokenizer at any context length.

The task families of RULER (Hsieh et al., 2024, "RULER: What's the Real
Context Size of Your Long-Context Language Models?"), written for kvengine:

- needles in a haystack of noise sentences: `niah_single` (one needle),
  `niah_multikey` (the asked needle among needles with other keys),
  `niah_multivalue` (four needles share the key; all values are asked),
  `niah_multiquery` (four needles, one question each: several questions per
  context, all answered from one compressed cache);
- `vt`, variable tracking: a chain of assignments `VAR B = A` from a value,
  with a distractor chain; the question asks for every name in the chain;
- `cwe`, common-word extraction: a numbered list of made-up words in which
  ten words occur far more often than the rest;
- `fwe`, frequent-word extraction: a stream of made-up words with a few
  words far more frequent; the question asks for the three most frequent.

The needle tasks' haystack is "noise" (repeated noise sentences, RULER's
noise variant) or "prose" (consecutive sentences of a public-domain text from
an installed package, from a seed-chosen sentence; see haystack.py).
Contexts are at most `length` tokens and within one filler unit (a word or
list item) of it.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

from kvengine.eval.tasks.example import Question, Tokenizer
from kvengine.eval.tasks.haystack import fit, haystack_builder, made_up_words

Generated = tuple[list[tuple[float, str]], tuple[Question, ...]]  # (inserts at depths, questions)
_NUM_NEEDLES = 4


def _code(rng: random.Random, used: set[str]) -> str:
    """A fresh 7-digit number (the noise holds no digits, so it occurs only where planted)."""
    while True:
        value = str(rng.randrange(1_000_000, 10_000_000))
        if value not in used and not any(value in u or u in value for u in used):
            used.add(value)
            return value


def _needle(key: str, value: str) -> str:
    return f"The secret code for {key} is {value}."


def _ask_code(key: str) -> str:
    return f"What is the secret code for {key}? Answer with the number only."


def _spread(rng: random.Random, num: int) -> list[float]:
    return [rng.random() for _ in range(num)]


def _niah_single(rng: random.Random, depth: float) -> Generated:
    key, used = made_up_words(rng, 1)[0], set[str]()
    value = _code(rng, used)
    return [(depth, _needle(key, value))], (Question(_ask_code(key), (value,)),)


def _niah_multikey(rng: random.Random, depth: float) -> Generated:
    keys, used = made_up_words(rng, _NUM_NEEDLES), set[str]()
    values = [_code(rng, used) for _ in keys]
    depths = [depth, *_spread(rng, _NUM_NEEDLES - 1)]
    inserts = [(d, _needle(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
    return inserts, (Question(_ask_code(keys[0]), (values[0],)),)


def _niah_multivalue(rng: random.Random, depth: float) -> Generated:
    key, used = made_up_words(rng, 1)[0], set[str]()
    values = [_code(rng, used) for _ in range(_NUM_NEEDLES)]
    depths = [depth, *_spread(rng, _NUM_NEEDLES - 1)]
    inserts = [(d, _needle(key, v)) for d, v in zip(depths, values, strict=True)]
    question = f"What are all the secret codes for {key}? List every number."
    return inserts, (Question(question, tuple(values)),)


def _niah_multiquery(rng: random.Random, depth: float) -> Generated:
    keys, used = made_up_words(rng, _NUM_NEEDLES), set[str]()
    values = [_code(rng, used) for _ in keys]
    depths = [depth, *_spread(rng, _NUM_NEEDLES - 1)]
    inserts = [(d, _needle(k, v)) for d, k, v in zip(depths, keys, values, strict=True)]
    return inserts, tuple(Question(_ask_code(k), (v,)) for k, v in zip(keys, values, strict=True))


def _var_names(rng: random.Random, count: int) -> list[str]:
    names: set[str] = set()
    while len(names) < count:
        names.add("".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(5)))
    ordered = sorted(names)  # a set's order depends on PYTHONHASHSEED: sort, then shuffle by the seed
    rng.shuffle(ordered)
    return ordered


def _vt(rng: random.Random, depth: float, num_hops: int = 4) -> Generated:
    """Two chains of assignments; the asked chain starts at `depth`, each hop later than the last."""
    names, used = _var_names(rng, 2 * (num_hops + 1)), set[str]()
    value, other = _code(rng, used), _code(rng, used)
    inserts: list[tuple[float, str]] = []
    for chain, start, chain_value in (
        (names[: num_hops + 1], depth, value),
        (names[num_hops + 1 :], rng.random(), other),
    ):
        steps = [f"VAR {chain[0]} = {chain_value}."] + [
            f"VAR {b} = {a}." for a, b in itertools.pairwise(chain)
        ]
        inserts += [(start + (1.0 - start) * i / (num_hops + 1), s) for i, s in enumerate(steps)]
    question = (
        f"Which variables are assigned the value {value}, directly or through other variables? "
        "List all of their names."
    )
    return inserts, (Question(question, tuple(names[: num_hops + 1])),)


NEEDLE_TASKS: dict[str, Callable[[random.Random, float], Generated]] = {
    "niah_single": _niah_single,
    "niah_multikey": _niah_multikey,
    "niah_multivalue": _niah_multivalue,
    "niah_multiquery": _niah_multiquery,
    "vt": _vt,
}


def needle_context(
    task: str, tokenizer: Tokenizer, length: int, depth: float, rng: random.Random, haystack: str = "noise"
) -> tuple[str, int, tuple[Question, ...]]:
    """(context, its tokens, questions) of a needle task: `haystack` sentences fitted around the needles."""
    inserts, questions = NEEDLE_TASKS[task](rng, depth)
    build = haystack_builder(haystack, rng)  # after the needles' draws: noise examples stay as they were
    context, num_tokens = fit(tokenizer, length, lambda n: build(n, inserts), 2)
    return context, num_tokens, questions
