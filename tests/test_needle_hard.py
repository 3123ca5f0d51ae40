"""The hard needle task: planted once at its depth, a distractor close by, prose from the stdlib, on budget."""

from __future__ import annotations

import re

import pytest

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks import RULER_TASKS, expand_task_names, make_example, score
from kvengine.eval.tasks.haystack import prose_sentences
from kvengine.eval.tasks.needle_hard import reference_sentences


class WordTokenizer:
    """One token per word or punctuation mark, a BPE-like granularity."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return re.findall(r"\w+|[^\w\s]", text)


TOK = WordTokenizer()
FACT = re.compile(r"The access code of the ([a-z ]+) is (\d{6})\.")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.7, 1.0])
@pytest.mark.parametrize("length", [1024, 4096])
def test_needle_and_distractor_planted_once_near_depth(length: int, depth: float) -> None:
    ex = make_example("needle_hard", TOK, length, seed=3, index=1, depth=depth)
    assert 0.98 * length <= ex.num_tokens <= length and ex.depth == depth
    facts = FACT.findall(ex.context)
    assert len(facts) == 2, "exactly the needle and its distractor"
    assert len(re.findall(r"\d", ex.context)) == 12, "no digit in the haystack besides the two codes"
    (question,) = ex.questions
    (answer,) = question.answers
    asked = [room for room, code in facts if code == answer]
    assert len(asked) == 1 and asked[0] in question.text
    other_room, other_code = next(f for f in facts if f[1] != answer)
    assert other_room not in question.text and other_code != answer
    assert score(question.answers, other_code) == 0.0  # the distractor's code scores as wrong
    # The needle sits at its depth (by characters, within a few sentences); the distractor is close.
    at = ex.context.index(answer) / len(ex.context)
    assert abs(at - depth) < 0.03
    near = ex.context.index(other_code) / len(ex.context)
    assert 0 < abs(near - at) < 0.06


def test_deterministic_and_seeded() -> None:
    a = make_example("needle_hard", TOK, 2048, seed=1, index=0, depth=0.5)
    b = make_example("needle_hard", TOK, 2048, seed=1, index=0, depth=0.5)
    c = make_example("needle_hard", TOK, 2048, seed=2, index=0, depth=0.5)
    assert a == b and a.context != c.context


def test_haystack_is_reference_prose_not_the_bible() -> None:
    sentences = {" ".join(s) for s in reference_sentences()}
    assert len(sentences) > 1000 and not any(re.search(r"\d", s) for s in sentences)
    bible = {" ".join(s) for s in prose_sentences()}
    assert not sentences & bible
    ex = make_example("needle_hard", TOK, 1024, seed=0, depth=0.5)
    rest = " ".join(FACT.sub(" ", ex.context).split())
    corpus = " ".join(" ".join(s) for s in reference_sentences())
    assert rest[: len(rest) * 9 // 10] in corpus + " " + corpus  # consecutive sentences (wrapping)


def test_registered_outside_ruler() -> None:
    assert expand_task_names(["needle_hard"]) == ["needle_hard"]
    assert "needle_hard" not in expand_task_names(["ruler"]) and "needle_hard" not in RULER_TASKS
    with pytest.raises(InvalidRequestError, match="needle_hard"):
        expand_task_names(["needle_hardest"])  # the error lists the known tasks, this one among them
    with pytest.raises(InvalidRequestError, match="depth"):
        make_example("needle_hard", TOK, 1024, seed=0, depth=1.5)
