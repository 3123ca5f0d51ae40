"""The OpenAI-compatible HTTP app over an `AsyncEngine`: `create_app`.

Routes: POST /v1/completions, POST /v1/chat/completions (both with
`stream: true` as server-sent events), GET /v1/models, GET /health, GET
/metrics (Prometheus). Bodies are read and parsed by the routes rather than
by FastAPI, so that every bad input (too large, not UTF-8, not JSON, wrong
types) gets a 4xx with OpenAI's error body and never a 5xx; the OpenAPI
document still declares them (see openapi.py). The app's lifespan starts the
engine's driver; on shutdown it closes the driver, which aborts what is still
running, then the engine, which flushes its storage tiers.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from kvengine.config import ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.models import LoadedModel
from kvengine.server import openai_format as fmt
from kvengine.server.metrics import RequestMetricsMiddleware
from kvengine.server.openapi import declare_request_bodies, error_responses
from kvengine.server.schemas import ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse
from kvengine.server.service import Job, Service
from kvengine.server.tenancy import public_prefix_ids


async def _respond(server: Service, chat: bool, body: CompletionRequest | ChatRequest, job: Job) -> Any:
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
    server: Service, chat: bool, body: CompletionRequest | ChatRequest, job: Job, rid: str
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
    Each of `config.public_prefixes` is registered with the engine here.
    """
    server = Service(engine, model, config)
    for text in config.public_prefixes:
        for ids in public_prefix_ids(model, text):
            engine.engine.add_public_prefix(ids)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.close()  # the driver first: no step may run while the tiers close
            engine.engine.close()

    app = FastAPI(title="kvengine", lifespan=lifespan)
    app.state.server = server  # for tests: requests in flight, limits, metrics
    fmt.add_error_handlers(app)
    _add_routes(app, server)
    declare_request_bodies(app, {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatRequest})
    routes = frozenset(str(getattr(r, "path", "")) for r in app.routes)
    app.add_middleware(RequestMetricsMiddleware, metrics=server.metrics, routes=routes)
    return app


def _add_routes(app: FastAPI, server: Service) -> None:
    model = server.model

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus metrics; served without an API key (see ServerConfig)."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

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

    errors = error_responses(400, 401, 404, 413, 429)

    @app.post("/v1/completions", responses={**_ok(CompletionResponse), **errors})
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

    @app.post("/v1/chat/completions", responses={**_ok(ChatCompletionResponse), **errors})
    async def chat_completions(request: Request) -> Any:
        salt = server.tenant(request)
        body = await server.read_body(request, ChatRequest)
        ids = fmt.render_chat(model, body.messages)
        return await _respond(server, True, body, server.job(body, ids, salt))


def _ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is `model` as JSON, or server-sent events with `"stream": true`."""
    return {200: {"model": model, "content": {"text/event-stream": {}}}}
