"""Word-counting tasks of RULER: common-word and frequent-word extraction.

Both fill the whole context with made-up words (no haystack): the answers
are the words that occur most often, so they appear many times by design
and have no depth.
"""

from __future__ import annotations

import random

from kvengine.eval.tasks.example import Question, Tokenizer
from kvengine.eval.tasks.haystack import fit, made_up_words

_NUM_COMMON = 10
_NUM_FREQUENT = 3


def common_words(
    tokenizer: Tokenizer, length: int, rng: random.Random
) -> tuple[str, int, tuple[Question, ...]]:
    """A numbered list where ten words occur `max(4, length // 200)` times each and the others 3 times.

    The list grows by uncommon words (3 occurrences each) until `length` is reached.
    """
    common_count = max(4, length // 200)
    vocab = made_up_words(rng, _NUM_COMMON + length // 3 + 1)
    common, rare = vocab[:_NUM_COMMON], vocab[_NUM_COMMON:]
    shuffle_seed = rng.random()

    def build(num_rare: int) -> str:
        items = common * common_count + rare[: (num_rare + 2) // 3] * 3
        items = items[: len(common) * common_count + num_rare]
        random.Random(shuffle_seed).shuffle(items)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

    context, num_tokens = fit(tokenizer, length, build, 5)
    question = "What are the 10 most common words in the numbered list above? List the words."
    return context, num_tokens, (Question(question, tuple(common)),)


def frequent_words(
    tokenizer: Tokenizer, length: int, rng: random.Random
) -> tuple[str, int, tuple[Question, ...]]:
    """A stream of made-up words: three words take 1/8, 1/11 and 1/15 of it, every other word at most twice."""
    vocab = made_up_words(rng, _NUM_FREQUENT + length)
    top, rest = vocab[:_NUM_FREQUENT], vocab[_NUM_FREQUENT:]
    shuffle_seed = rng.random()

    def build(num_words: int) -> str:
        counts = [num_words // 8, num_words // 11, num_words // 15]
        items = [w for w, c in zip(top, counts, strict=True) for _ in range(c)]
        filler = num_words - len(items)
        items += (rest * 2)[:filler] if filler <= 2 * len(rest) else rest * 2
        random.Random(shuffle_seed).shuffle(items)
        return " ".join(items)

    context, num_tokens = fit(tokenizer, length, build, 3)
    question = "What are the three most frequently used words in the text above? List the words."
    return context, num_tokens, (Question(question, tuple(top)),)
