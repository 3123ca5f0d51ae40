"""One choice of a request as the engine runs it (`Job`), and what a body's fields become.

The service (service.py) makes jobs; the routes (app.py) run them and read
back what they cost. Here are the pieces of a body that need no server
state: its grammar (`response_format`), its output limit, and the rule that
an InvalidRequestError is a 400.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvengine.engine.constraints import Grammar
from kvengine.engine.logprobs import Logprob
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.press.base import Press
from kvengine.server import openai_format as fmt
from kvengine.server.logprobs import ChoiceLogprobs
from kvengine.server.schemas import ChatRequest, CompletionRequest


@dataclass
class Job:
    """One accepted request: what to run, and what it cost once it ran."""

    prompt_ids: list[int]
    params: SamplingParams
    press: Press | None
    cache_salt: str
    echo: bool = False  # the choice's text starts with the prompt's (completions)
    group: int = 0  # the prompt's index in its request: a prompt's `n` choices share its blocks
    hide_logprobs: bool = False  # recorded only to rank `best_of` choices, not shown
    seq_id: int | None = None  # the engine's, once admitted
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprob] = field(default_factory=list)  # one per output token, if asked for
    prompt_logprobs: list[Logprob | None] | None = None  # if asked for
    num_completion: int = 0
    num_cached: int = 0
    arrival: float = field(default_factory=time.monotonic)  # accepted: parsed and checked

    def usage(self) -> dict[str, Any]:
        return fmt.usage(len(self.prompt_ids), self.num_completion, self.num_cached)

    def choice(self, tokenizer: Any, chat: bool, text: str) -> tuple[str, dict[str, Any] | None]:
        """The choice's text (after the echoed prompt, if any) and logprobs object, once the job ended."""
        prompt = str(tokenizer.decode(self.prompt_ids, skip_special_tokens=True)) if self.echo else ""
        if self.params.logprobs is None or self.hide_logprobs:
            return prompt + text, None
        out = ChoiceLogprobs(tokenizer, chat, len(prompt)).format(self.output_ids, self.logprobs)
        if self.echo and self.prompt_logprobs is not None:
            head = ChoiceLogprobs(tokenizer, chat).format(self.prompt_ids, self.prompt_logprobs)
            out = {key: head[key] + out[key] for key in out}
        return prompt + text, out


def grammar_of(body: CompletionRequest | ChatRequest) -> Grammar | None:
    """The grammar of a chat's `response_format` (None for text); 400 naming it if unusable."""
    form = body.response_format if isinstance(body, ChatRequest) else None
    if form is None or form.type == "text":
        return None
    if form.type == "json_object":
        return Grammar.json_object()
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise fmt.APIError(
            400, "response_format: json_schema needs json_schema.schema", param="response_format"
        )
    with as_400(param="response_format"):
        return Grammar.from_schema(form.json_schema.schema_)


def max_tokens_of(body: CompletionRequest | ChatRequest) -> int | None:
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


_API_NAMES = {"grammar": "response_format"}  # the engine's names of what a body calls otherwise


@contextlib.contextmanager
def as_400(param: str | None = None) -> Iterator[None]:
    """InvalidRequestError raised inside, answered as a 400 naming `param` (or the error's own)."""
    try:
        yield
    except InvalidRequestError as exc:
        name = param or _API_NAMES.get(exc.param or "", exc.param)
        message = f"{name}: {exc}" if name and not str(exc).startswith(name) else str(exc)
        raise fmt.APIError(400, message, param=name) from None
