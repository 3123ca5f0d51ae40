"""A user's own tasks from a JSONL file: one question per line, `{"context", "question", "answers"}`.

`answers` is a string or a list of strings (all must appear in a correct
output). Consecutive lines with the same context (and task) become one
example with several questions, so one compressed cache answers them all.
An optional `task` field names the task (default: the file's stem).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvengine.errors import InvalidRequestError
from kvengine.eval.tasks.example import Example, Question, Tokenizer, count_tokens

REQUIRED = ("context", "question", "answers")


def _parse_line(path: Path, line_no: int, line: str) -> tuple[str, str, Question]:
    where = f"{path}:{line_no}"
    try:
        record: Any = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise InvalidRequestError(f"{where}: expected a JSON object with fields {', '.join(REQUIRED)}")
    missing = [f for f in REQUIRED if f not in record]
    if missing:
        raise InvalidRequestError(f"{where}: missing field {', '.join(map(repr, missing))}")
    context, question, answers = record["context"], record["question"], record["answers"]
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise InvalidRequestError(
            f"{where}: 'answers' must be a non-empty string or list of non-empty strings"
        )
    for name, value in (("context", context), ("question", question)):
        if not isinstance(value, str) or not value.strip():
            raise InvalidRequestError(f"{where}: {name!r} must be a non-empty string")
    task = record.get("task", path.stem)
    if not isinstance(task, str) or not task:
        raise InvalidRequestError(f"{where}: 'task' must be a non-empty string")
    return task, context, Question(question, tuple(answers))


def load_jsonl_tasks(path: Path, tokenizer: Tokenizer | None = None) -> list[Example]:
    """The examples of a JSONL task file, in file order; blank lines are skipped.

    With a tokenizer, each example's `length` and `num_tokens` are its context's
    tokens; without, both are 0. Errors name the file, the line and the field.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"cannot read task file {path}: {exc}") from None
    groups: list[tuple[str, str, list[Question]]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        task, context, question = _parse_line(path, line_no, line)
        if groups and groups[-1][:2] == (task, context):
            groups[-1][2].append(question)
        else:
            groups.append((task, context, [question]))
    if not groups:
        raise InvalidRequestError(f"task file {path} has no examples")
    examples = []
    for i, (task, context, questions) in enumerate(groups):
        n = count_tokens(tokenizer, context) if tokenizer is not None else 0
        examples.append(Example(task, context, tuple(questions), n, n, None, f"{path.name}:{i}"))
    return examples
