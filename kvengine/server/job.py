"""One choice of a request as the engine runs it (`Job`), and what a body's fields become.

The service (service.py) makes jobs; the routes (app.py) run them and read
back what they cost. Here are the pieces of a body that need no server
state: its grammar (`response_format`), its output limit, its reusable chunks
(`kv_chunks`, `kv_blend`), the rule that an InvalidRequestError is a 400,
and how one prompt's jobs are queued (`add_jobs`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.constraints import Grammar
from kvengine.engine.logprobs import Logprob
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError, UnsupportedModelError
from kvengine.models import LoadedModel
from kvengine.press.base import Press
from kvengine.rag.blend import BlendConfig
from kvengine.rag.rotation import check_rerotatable
from kvengine.rag.serving import add_rag
from kvengine.rag.spans import RagPrompt, parse_kv_chunks
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
    rag: tuple[RagPrompt, BlendConfig] | None = None  # kv_chunks: its context assembled from reused chunks

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


def rag_of(body: CompletionRequest | ChatRequest, prompt_ids: list[int], model: LoadedModel) -> Any:
    """The prompt's chunks and how they are reused (`kv_chunks`, `kv_blend`), or None; 400 naming the field."""
    if not isinstance(body, CompletionRequest) or body.kv_chunks is None:
        if isinstance(body, CompletionRequest) and body.kv_blend is not None:
            raise fmt.APIError(400, "kv_blend needs kv_chunks", param="kv_blend")
        return None
    conflict = {
        "one prompt": len(body.prompts()) != 1,
        "n = 1 (no best_of)": body.n != 1 or (body.best_of or 1) != 1,
        "no kv_press": body.kv_press is not None,
        "no prompt scoring (echo with logprobs)": body.echo and body.logprobs is not None,
        "no semantic_cache": body.semantic_cache is not None,
    }
    for need, broken in conflict.items():
        if broken:
            raise fmt.APIError(400, f"kv_chunks needs {need}", param="kv_chunks")
    options = body.kv_blend
    blend = BlendConfig(**options.model_dump()) if options is not None else BlendConfig()  # same field names
    with as_400(param="kv_chunks"):
        spans = parse_kv_chunks(body.kv_chunks, len(prompt_ids), model.max_context_len)
    if blend.mode != "full":
        try:
            check_rerotatable(model)
        except UnsupportedModelError as exc:
            raise fmt.APIError(400, f"kv_chunks: {exc}", param="kv_chunks") from None
    return RagPrompt(list(prompt_ids), spans), blend


async def add_jobs(llm: AsyncEngine, jobs: list[Job]) -> list[int]:
    """Queue one prompt's jobs: its choices on one prefill (`add_parallel`), or its context from chunks."""
    first = jobs[0]
    if first.rag is None:
        return await llm.add_parallel(
            first.prompt_ids, [j.params for j in jobs], press=first.press, cache_salt=first.cache_salt
        )
    prompt, blend = first.rag
    try:
        return [await add_rag(llm, prompt, first.params, blend, first.cache_salt)]
    except UnsupportedModelError as exc:
        raise InvalidRequestError(str(exc), param="kv_chunks") from None


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
