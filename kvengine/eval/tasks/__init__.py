"""Evaluation tasks: RULER-style synthetic generators and a user's JSONL tasks.

Every task yields `Example`s: a context, several questions with their
answers, and metadata (task, length, depth). Generators are deterministic in
(task, length, seed, index, depth) and the tokenizer; nothing is downloaded.
"""

from kvengine.eval.tasks.example import Example, Question, Tokenizer, count_tokens, score
from kvengine.eval.tasks.jsonl import load_jsonl_tasks
from kvengine.eval.tasks.registry import (
    RULER_TASKS,
    default_depth,
    expand_task_names,
    make_example,
    uses_depth,
)

__all__ = [
    "RULER_TASKS",
    "Example",
    "Question",
    "Tokenizer",
    "count_tokens",
    "default_depth",
    "expand_task_names",
    "load_jsonl_tasks",
    "make_example",
    "score",
    "uses_depth",
]
