"""Tasks by name, and `make_example`: one deterministic example from (task, length, seed, index)."""

from __future__ import annotations

import random

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks.example import Example, Tokenizer
from kvengine.eval.tasks.haystack import HAYSTACKS
from kvengine.eval.tasks.needle_hard import needle_hard_context
from kvengine.eval.tasks.ruler import NEEDLE_TASKS, needle_context
from kvengine.eval.tasks.words import common_words, frequent_words

WORD_TASKS = {"cwe": common_words, "fwe": frequent_words}
RULER_TASKS = (*NEEDLE_TASKS, *WORD_TASKS)
OTHER_TASKS = ("needle_hard",)  # not RULER's: "ruler" does not include them
MIN_LENGTH = 128  # below this the word tasks' counts stop separating the answers from the rest


def expand_task_names(names: list[str]) -> list[str]:
    """Task names with "ruler" standing for every RULER task; unknown names fail listing the known ones."""
    known = (*RULER_TASKS, *OTHER_TASKS)
    out: list[str] = []
    for name in names:
        for task in RULER_TASKS if name == "ruler" else (name,):
            if task not in known:
                raise InvalidRequestError(f"unknown task {task!r}; known tasks: ruler, {', '.join(known)}")
            if task not in out:
                out.append(task)
    return out


def default_depth(index: int, num_examples: int) -> float:
    """Example `index` of `num_examples` sits at the middle of its share of depths, so a run covers [0, 1]."""
    return (index + 0.5) / num_examples


def uses_depth(task: str) -> bool:
    """Whether `task` places its answer at a depth (the word-counting tasks have none)."""
    return task not in WORD_TASKS


def make_example(
    task: str,
    tokenizer: Tokenizer,
    length: int,
    seed: int,
    index: int = 0,
    depth: float = 0.5,
    max_len: int | None = None,
    haystack: str = "noise",
) -> Example:
    """Example `index` of `task` with a context of at most `length` tokens (within one filler unit).

    The same (task, length, seed, index, depth) and tokenizer give the same
    example. `depth` places the (first) answer, as a fraction of the context;
    the word tasks ignore it. `max_len` is the model's context length: longer
    requests fail. `haystack` ("noise" or "prose") is the needle tasks'
    filler; the word tasks have none. Raises InvalidRequestError for an
    unknown task or haystack, a depth outside [0, 1], a length out of range,
    or prose whose package is not installed.
    """
    expand_task_names([task])
    if haystack not in HAYSTACKS:
        raise InvalidRequestError(f"unknown haystack {haystack!r}; known haystacks: {', '.join(HAYSTACKS)}")
    if not 0.0 <= depth <= 1.0:
        raise InvalidRequestError(f"depth must be in [0, 1], got {depth}")
    if length < MIN_LENGTH:
        raise InvalidRequestError(f"context length must be at least {MIN_LENGTH} tokens, got {length}")
    if max_len is not None and length > max_len:
        raise InvalidRequestError(
            f"context length {length} is beyond the model's context of {max_len} tokens"
        )
    example_seed = f"{seed}:{task}:{length}:{index}"
    rng = random.Random(example_seed)  # a str seed is hashed with SHA-512: the same on every run
    try:
        if task in WORD_TASKS:
            context, num_tokens, questions = WORD_TASKS[task](tokenizer, length, rng)
            return Example(task, context, questions, length, num_tokens, None, example_seed)
        if task == "needle_hard":  # its own haystack (see needle_hard.py): `haystack` does not apply
            context, num_tokens, questions = needle_hard_context(tokenizer, length, depth, rng)
            return Example(task, context, questions, length, num_tokens, depth, example_seed)
        context, num_tokens, questions = needle_context(task, tokenizer, length, depth, rng, haystack)
    except InvalidRequestError:
        raise  # already names the problem (a missing prose package: its install command)
    except ValueError as exc:
        raise InvalidRequestError(f"task {task!r} at {length} tokens: {exc}") from None
    return Example(task, context, questions, length, num_tokens, depth, example_seed)
