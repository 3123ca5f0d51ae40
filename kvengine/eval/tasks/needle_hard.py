"""`needle_hard`: a code in real prose from another source, with a distractor code right next to it.

Harder than the RULER needles in three ways:

- the haystack is real technical prose that nobody in this project wrote and
  that the "prose" haystack (the King James Bible) does not share: the
  Python Language Reference topics that ship with every CPython as
  `pydoc_data.topics` (the text `help("assert")` prints; PSF licence). Only
  its paragraphs of running text are used: indented blocks (code, grammar
  rules) and headings are dropped, and so is every sentence holding a digit,
  so the planted codes occur nowhere else. The text is that of the running
  Python's version (3.11 here): examples are deterministic per Python minor
  version.
- a distractor sits next to the needle: the same sentence shape with another
  room and another 6-digit code, within a few sentences before or after it,
  so a cache that keeps "a code near there" but not the right one answers
  wrong.
- the question names the room and is asked after the context (and after any
  compression): `kvengine eval` prefills the context alone and asks the
  question of the compressed copy, so a question-aware press cannot cheat.

This module only generates; nothing is downloaded and nothing is cached on disk.
"""

from __future__ import annotations

import functools
import random
import re

from kvengine.eval.tasks.example import Question, Tokenizer
from kvengine.eval.tasks.haystack import fit, take_words, with_inserts

ROOMS = (
    "archive room",
    "boiler room",
    "map room",
    "server room",
    "print shop",
    "chart office",
    "radio hut",
    "seed vault",
)
DISTRACTOR_GAP = 0.02  # the distractor's distance from the needle, as a fraction of the context


@functools.cache
def reference_sentences() -> tuple[tuple[str, ...], ...]:
    """The Python Language Reference's running text as sentences in reading order, each a tuple of words.

    Read from `pydoc_data.topics` (part of the standard library): paragraphs
    whose lines are indented (code, grammar), headings (a line underlined with
    `*`, `=` or `-`) and sentences with a digit or fewer than four words are
    dropped.
    """
    from pydoc_data.topics import topics  # the standard library's; imported late: 0.5 MB of text

    sentences: list[tuple[str, ...]] = []
    for text in topics.values():
        for paragraph in re.split(r"\n\s*\n", text):
            lines = paragraph.split("\n")
            if any(line.startswith((" ", "\t")) for line in lines if line.strip()):
                continue
            if len(lines) >= 2 and re.fullmatch(r"[*=\-^~]{3,}", lines[-1].strip()):
                continue
            flat = " ".join(paragraph.split())
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z\"])", flat):
                words = tuple(sentence.split())
                if len(words) >= 4 and not re.search(r"\d", sentence) and sentence.endswith((".", ":")):
                    sentences.append(words)
    return tuple(sentences)


def reference_prose(num_words: int, offset: int) -> list[str]:
    """Consecutive sentences from sentence `offset` on (wrapping around), cut after `num_words` words."""
    return take_words(reference_sentences(), num_words, offset)


def _code(rng: random.Random, other: str = "") -> str:
    """A 6-digit code that shares no 3-digit run with `other` (a near-copy would score as right)."""
    while True:
        value = str(rng.randrange(100_000, 1_000_000))
        if not any(value[i : i + 3] in other for i in range(4)):
            return value


def _fact(room: str, code: str) -> str:
    return f"The access code of the {room} is {code}."


def needle_hard_context(
    tokenizer: Tokenizer, length: int, depth: float, rng: random.Random
) -> tuple[str, int, tuple[Question, ...]]:
    """(context, its tokens, questions): reference prose fitted around the needle and its distractor.

    The asked room and the distractor's room, both codes, which side the
    distractor is on and where the prose starts are drawn from `rng`.
    """
    room, other_room = rng.sample(ROOMS, 2)
    code = _code(rng)
    other_code = _code(rng, code)
    side = rng.choice((-1.0, 1.0))
    if depth + side * DISTRACTOR_GAP < 0.0 or depth + side * DISTRACTOR_GAP > 1.0:
        side = -side  # stay inside the context: at depth 0 the distractor follows, at 1 it precedes
    inserts = [(depth, _fact(room, code)), (depth + side * DISTRACTOR_GAP, _fact(other_room, other_code))]
    offset = rng.randrange(len(reference_sentences()))

    def build(num_words: int) -> str:
        return with_inserts(reference_prose(num_words, offset), inserts, by_words=True)

    context, num_tokens = fit(tokenizer, length, build, 2)
    question = f"What is the access code of the {room}? Answer with the code only."
    return context, num_tokens, (Question(question, (code,)),)
