"""Filler for synthetic contexts: repeated noise sentences, made-up words, fitting to a token budget.

The noise sentences hold no digits and no capital letters past their first,
so numbers and upper-case names planted in a haystack occur nowhere else.
Made-up words are built from syllables, so no word list is downloaded.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from kvengine.bench.tasks.example import Tokenizer, count_tokens

NOISE = (
    "The river runs slowly past the hill.",
    "A cold wind blows over the fields.",
    "The lamps are lit at dusk.",
    "Nothing much happens on quiet days.",
    "The road bends toward the sea.",
    "Birds rest on the old stone wall.",
)
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


def with_inserts(filler: Sequence[str], inserts: Sequence[tuple[float, str]]) -> str:
    """`filler` sentences with each (depth, sentence) put at that fraction of them, joined by spaces.

    Inserts at the same depth keep their given order.
    """
    pieces = list(filler)
    positions = [round(depth * len(filler)) for depth, _ in inserts]
    # Insert from the back so earlier positions still index the original filler; at one position the
    # later insert goes in first, so the earlier one lands before it.
    order = sorted(range(len(inserts)), key=lambda i: (positions[i], i), reverse=True)
    for i in order:
        pieces.insert(positions[i], inserts[i][1])
    return " ".join(pieces)


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
