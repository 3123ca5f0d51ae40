"""What an evaluation example is, and how an answer is scored.

An example is one context asked several questions; each question has the
strings a correct answer must contain. Scoring is RULER's "all references
present" string match: the fraction of a question's references found in the
output, case-insensitively. Nothing here knows about models or caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class Tokenizer(Protocol):
    """What the task generators need of a tokenizer: text -> token ids."""

    def encode(self, text: str, *args: Any, **kwargs: Any) -> Any: ...


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]  # every one must appear in a correct output


@dataclass(frozen=True)
class Example:
    """One context and its questions, with how it was made.

    `length` is the number of context tokens asked for; `num_tokens` the number
    the context has (at most `length`, within one filler unit below it).
    `depth` is where the (first) answer sits, as a fraction of the context, or
    None for tasks whose answers are spread through it.
    """

    task: str
    context: str
    questions: tuple[Question, ...]
    length: int
    num_tokens: int
    depth: float | None
    seed: int | str

    @property
    def metadata(self) -> dict[str, Any]:
        return {"task": self.task, "length": self.length, "num_tokens": self.num_tokens, "depth": self.depth}


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Tokens of `text` without special tokens (what the context adds to a prompt)."""
    return len(tokenizer.encode(text, add_special_tokens=False))


def score(answers: tuple[str, ...], output: str) -> float:
    """Fraction of `answers` found in `output`, ignoring case (1.0 when there are none)."""
    if not answers:
        return 1.0
    text = output.lower()
    return sum(a.lower() in text for a in answers) / len(answers)
