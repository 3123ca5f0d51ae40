"""The OpenAI-compatible HTTP app over an `AsyncEngine`: `create_app`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /v1/models, GET /health. Bodies are
read and parsed here rather than by FastAPI, so that every bad input (too
large, not UTF-8, not JSON, wrong types) gets a 4xx with OpenAI's error body
and never a 5xx. The app's lifespan starts the engine's driver and closes it
on shutdown, which aborts what is still running.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
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
from kvengine.server.schemas import ChatRequest, CompletionRequest

B = TypeVar("B", bound=BaseModel)


@dataclass
class _Job:
    """One accepted request: what to run, and what it cost once it ran."""

    prompt_ids: list[int]
    params: SamplingParams
    press: Press | None
    cache_salt: str
    num_completion: int = 0
    num_cached: int = 0

    def usage(self) -> dict[str, Any]:
        return fmt.usage(len(self.prompt_ids), self.num_completion, self.num_cached)


class _Server:
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

    def tenant(self, request: Request) -> str:
        """The prefix-cache salt of the caller; 401 unless it sent a configured key."""
        if not self.config.api_keys:
            return ""
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise fmt.APIError(401, "missing API key: send Authorization: Bearer KEY", "authentication_error")
        # compare_digest on every key: the time taken does not say which key was close.
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in self.config.api_keys):
            raise fmt.APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
        return hashlib.sha256(b"kvengine-tenant:" + key.encode()).hexdigest()

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

    def job(self, body: CompletionRequest | ChatRequest, prompt_ids: list[int], salt: str) -> _Job:
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
        max_tokens = _max_tokens(body)
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
        return _Job(prompt_ids, params, press, salt)

    async def run(self, job: _Job) -> AsyncGenerator[tuple[str, str | None], None]:
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
        ids: list[int] = []
        try:
            async with contextlib.aclosing(self.llm.stream(seq_id)) as events:
                async for event in events:
                    ids.append(event.token_id)
                    job.num_completion = len(ids)
                    delta = text.update(ids, event.finished)
                    if text.stopped or event.finished:  # a stop string ends it early: the stream aborts
                        yield delta, "stop" if text.stopped else event.finish_reason or "stop"
                        return
                    if delta:
                        yield delta, None
            yield "", "abort"  # ended without a last token: the engine is shutting down
        finally:
            job.num_cached = seq.num_cached_tokens

    def acquire(self) -> None:
        """Take one of `max_concurrent_requests` (429 when all are taken); `release` gives it back."""
        if self.num_in_flight >= self.config.max_concurrent_requests:
            raise fmt.APIError(
                429, f"{self.num_in_flight} requests in flight, the limit; retry later", "rate_limit_error"
            )
        self.num_in_flight += 1

    def release(self) -> None:
        self.num_in_flight -= 1


def _max_tokens(body: CompletionRequest | ChatRequest) -> int | None:
    if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
        return body.max_completion_tokens
    return body.max_tokens


async def _respond(server: _Server, chat: bool, body: CompletionRequest | ChatRequest, job: _Job) -> Any:
    """The JSON response, or the event stream when `body.stream` is set."""
    rid, name = fmt.new_id("chatcmpl" if chat else "cmpl"), server.model.name
    server.acquire()
    if body.stream:
        return StreamingResponse(_sse(server, chat, body, job, rid), media_type="text/event-stream")
    try:
        parts, finish = [], "stop"
        async with contextlib.aclosing(server.run(job)) as run:
            async for delta, reason in run:
                parts.append(delta)
                finish = reason or finish
    finally:
        server.release()
    return fmt.completion_object(chat, rid, name, "".join(parts), finish, job.usage())


async def _sse(
    server: _Server, chat: bool, body: CompletionRequest | ChatRequest, job: _Job, rid: str
) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this, which aborts the request."""
    name = server.model.name
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    first = True
    try:
        async with contextlib.aclosing(server.run(job)) as run:
            async for delta, reason in run:
                if delta or reason is not None or first:
                    yield fmt.chunk(
                        chat, rid, name, delta, reason, first=first, with_usage_field=include_usage
                    )
                    first = False
        if include_usage:
            yield fmt.chunk(chat, rid, name, None, None, usage_=job.usage(), with_usage_field=True)
        yield fmt.DONE
    except fmt.APIError as exc:  # the response has started: the error goes in the stream
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        server.release()


def create_app(engine: AsyncEngine, model: LoadedModel, config: ServerConfig) -> FastAPI:
    """The app serving `model` through `engine`; its lifespan starts the engine and closes it.

    The engine must not be started yet: it is started on the app's event loop.
    """
    server = _Server(engine, model, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.close()

    app = FastAPI(title="kvengine", lifespan=lifespan)
    app.state.server = server  # for tests and metrics: requests in flight, limits
    fmt.add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": model.name,
            "object": "model",
            "created": 0,
            "owned_by": "kvengine",
            "max_model_len": model.max_context_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        salt = server.tenant(request)
        body = await server.read_body(request, CompletionRequest)
        if isinstance(body.prompt, str):
            if not body.prompt:
                raise fmt.APIError(400, "the prompt is empty", param="prompt")
            ids = list(model.tokenizer.encode(body.prompt))  # type: ignore[union-attr]
        else:
            ids = list(body.prompt)
        return await _respond(server, False, body, server.job(body, ids, salt))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        salt = server.tenant(request)
        body = await server.read_body(request, ChatRequest)
        ids = fmt.render_chat(model, body.messages)
        return await _respond(server, True, body, server.job(body, ids, salt))

    return app
