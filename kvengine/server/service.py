"""The state behind the routes: `Service` (engine, model, limits, requests in flight) and `Job`.

`Service` turns a parsed request into a `Job` (checking it against the limits
and the press registry, 4xx if it cannot run) and runs it on the `AsyncEngine`
as a stream of text deltas. It knows nothing of HTTP responses or routes
(app.py), nor of OpenAI's wire format beyond the errors it raises.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvengine.config import ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.generate import _TextStream
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.base import Press
from kvengine.press.registry import press_from_spec
from kvengine.server import openai_format as fmt
from kvengine.server.metrics import ServerMetrics
from kvengine.server.schemas import ChatRequest, CompletionRequest
from kvengine.server.tenancy import tenant_salt

B = TypeVar("B", bound=BaseModel)


@dataclass
class Job:
    """One accepted request: what to run, and what it cost once it ran."""

    prompt_ids: list[int]
    params: SamplingParams
    press: Press | None
    cache_salt: str
    num_completion: int = 0
    num_cached: int = 0
    arrival: float = field(default_factory=time.monotonic)  # accepted: parsed and checked

    def usage(self) -> dict[str, Any]:
        return fmt.usage(len(self.prompt_ids), self.num_completion, self.num_cached)


class Service:
    """The state behind the routes: engine, model, limits, requests in flight."""

    def __init__(self, llm: AsyncEngine, model: LoadedModel, config: ServerConfig) -> None:
        if model.tokenizer is None:
            raise InvalidRequestError("the server needs a model with a tokenizer")
        self.llm = llm
        self.model = model
        self.config = config
        self.num_in_flight = 0
        # The engine refuses prompts that leave no room for a new token.
        self.max_prompt_tokens = min(config.max_prompt_tokens, model.max_context_len - 1)
        self.metrics = ServerMetrics(llm.engine, lambda: self.num_in_flight)

    def tenant(self, request: Request) -> str:
        return tenant_salt(self.config, request)

    async def read_body(self, request: Request, cls: type[B]) -> B:
        """The request body parsed as `cls`; 413 if too large, 400 if not UTF-8 JSON of that shape."""
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise fmt.APIError(413, f"request body over {limit} bytes", code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > limit:
                raise fmt.APIError(413, f"request body over {limit} bytes", code="request_too_large")
        try:
            obj = json.loads(bytes(data).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise fmt.APIError(400, f"request body is not UTF-8 (byte offset {exc.start})") from None
        except json.JSONDecodeError as exc:
            raise fmt.APIError(400, f"request body is not valid JSON: {exc}") from None
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            err = exc.errors()[0]
            param = ".".join(str(p) for p in err["loc"]) or None
            raise fmt.APIError(400, f"{param or 'body'}: {err['msg']}", param=param) from None

    def job(self, body: CompletionRequest | ChatRequest, prompt_ids: list[int], salt: str) -> Job:
        """Check a parsed request against the limits and the registry; 4xx if it cannot run."""
        if body.model is not None and body.model != self.model.name:
            raise fmt.APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.model.name!r}",
                param="model",
                code="model_not_found",
            )
        if body.n != 1:
            raise fmt.APIError(400, "only n=1 is supported", param="n")
        if not prompt_ids:
            raise fmt.APIError(400, "the prompt is empty", param="prompt")
        if len(prompt_ids) > self.max_prompt_tokens:
            raise fmt.APIError(
                400,
                f"the prompt has {len(prompt_ids)} tokens; at most {self.max_prompt_tokens} are allowed",
                param="prompt",
                code="context_length_exceeded",
            )
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise fmt.APIError(400, f"token ids must be in [0, {vocab})", param="prompt")
        max_tokens = max_tokens_of(body)
        room = self.model.max_context_len - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(self.config.max_tokens_limit, room)
        elif not 1 <= max_tokens <= self.config.max_tokens_limit:
            raise fmt.APIError(
                400,
                f"max_tokens must be in [1, {self.config.max_tokens_limit}], got {max_tokens}",
                param="max_tokens",
            )
        try:
            params = SamplingParams(
                max_tokens, body.temperature, body.top_p, body.top_k, body.seed, body.stop_strings()
            )
        except InvalidRequestError as exc:
            raise fmt.APIError(400, str(exc)) from None
        press = None
        if body.kv_press is not None:
            try:
                press = press_from_spec(body.kv_press, body.kv_compression_ratio)
            except InvalidRequestError as exc:
                raise fmt.APIError(400, str(exc), param="kv_press") from None
        return Job(prompt_ids, params, press, salt)

    async def run(self, job: Job) -> AsyncGenerator[tuple[str, str | None], None]:
        """(new text, finish reason or None) as the request runs; closing it aborts the request."""
        try:
            seq_id = await self.llm.add_request(
                job.prompt_ids, job.params, press=job.press, cache_salt=job.cache_salt
            )
        except InvalidRequestError as exc:
            raise fmt.APIError(400, str(exc)) from None
        # Held on to: the engine forgets a request as soon as its last token is out.
        seq = self.llm.engine.sequences[seq_id]
        text = _TextStream(self.model.tokenizer, job.params.stop)
        timer = self.metrics.timer(job.arrival)
        ids: list[int] = []
        ran_to_end = False
        try:
            async with contextlib.aclosing(self.llm.stream(seq_id)) as events:
                async for event in events:
                    timer.token()
                    ids.append(event.token_id)
                    job.num_completion = len(ids)
                    delta = text.update(ids, event.finished)
                    if text.stopped or event.finished:  # a stop string ends it early: the stream aborts
                        ran_to_end = True
                        yield delta, "stop" if text.stopped else event.finish_reason or "stop"
                        return
                    if delta:
                        yield delta, None
            yield "", "abort"  # ended without a last token: the engine is shutting down
        finally:
            job.num_cached = seq.num_cached_tokens
            timer.end(job.num_completion, job.num_cached, ran_to_end)

    def acquire(self) -> None:
        """Take one of `max_concurrent_requests` (429 when all are taken); `release` gives it back."""
        if self.num_in_flight >= self.config.max_concurrent_requests:
            raise fmt.APIError(
                429, f"{self.num_in_flight} requests in flight, the limit; retry later", "rate_limit_error"
            )
        self.num_in_flight += 1

    def release(self) -> None:
        self.num_in_flight -= 1


def max_tokens_of(body: CompletionRequest | ChatRequest) -> int | None:
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens
