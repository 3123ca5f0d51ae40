"""The OpenAI-compatible HTTP app over an `AsyncEngine`: `create_app`.

Routes: POST /v1/completions (one choice per prompt), POST
/v1/chat/completions (both with `stream: true` as server-sent events), GET
/v1/models, GET /health (liveness), GET /ready (readiness), GET /metrics
(Prometheus), and vLLM's POST /tokenize, POST /detokenize, GET /version
(tokenize.py). Bodies are read and parsed by the routes rather than
by FastAPI, so that every bad input (too large, not UTF-8, not JSON, wrong
types) gets a 4xx with OpenAI's error body and never a 5xx; the OpenAPI
document still declares them (see openapi.py). A request is admitted to the
engine before its response starts, so a stream the engine refuses gets a 4xx
too. The app's lifespan starts the engine's driver; on shutdown it closes the
driver, which aborts what is still running, then the engine, which flushes
its storage tiers. Before that, a graceful shutdown drains the app
(`Service.drain`, started on SIGTERM by serve.py): new requests get 503,
/ready says "draining", and what is in flight finishes or is ended with an
error (an error event and `data: [DONE]` in a stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from kvengine.config import ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.server import openai_format as fmt
from kvengine.server import semantic_cache as semantic
from kvengine.server.job import Job
from kvengine.server.logprobs import ChoiceLogprobs
from kvengine.server.metrics import RequestMetricsMiddleware
from kvengine.server.openapi import declare_request_bodies, error_responses
from kvengine.server.schemas import ChatCompletionResponse, ChatRequest, CompletionRequest, CompletionResponse
from kvengine.server.service import Service
from kvengine.server.tenancy import public_prefix_ids
from kvengine.server.tokenize import TOKEN_BODIES, add_token_routes


async def _respond(
    server: Service, chat: bool, body: CompletionRequest | ChatRequest, jobs: list[Job], request: Request
) -> Any:
    """The JSON response, or the event stream when `body.stream` is set; one choice per job."""
    rid = fmt.new_id("chatcmpl" if chat else "cmpl")
    await server.admit_all(jobs)  # before any response: a refused request gets its 4xx, streamed or not
    if body.stream:
        done = _Once(server, jobs)
        return _EventStream(_sse(server, chat, body, jobs, rid, done), done)
    try:
        collect = asyncio.ensure_future(_collect(server, jobs))
        while not collect.done():
            await asyncio.wait({collect}, timeout=DISCONNECT_POLL_S)
            if not collect.done() and await request.is_disconnected():
                collect.cancel()  # closes the runs, which aborts the requests and frees their blocks
                with contextlib.suppress(asyncio.CancelledError):
                    await collect
                return Response(status_code=499)  # nobody reads it; the code nginx uses for this
        choices = collect.result()
    except fmt.APIError:
        raise
    except InvalidRequestError as exc:
        raise fmt.APIError(400, str(exc), param=exc.param) from None
    except Exception as exc:
        raise fmt.APIError(500, f"the request failed in the engine: {_reason(exc)}", "server_error") from None
    finally:
        for _ in jobs:
            server.release()
    out = await asyncio.to_thread(_choices, server, chat, jobs, choices)  # decodes: off the event loop
    return fmt.completion_object(chat, rid, server.model_name, _best(jobs, out, body.n), _usage(jobs))


_Choice = tuple[str, str, dict[str, Any] | None]  # text, finish reason, logprobs object


def _choices(server: Service, chat: bool, jobs: list[Job], collected: list[tuple[str, str]]) -> list[_Choice]:
    """(text, finish reason, logprobs) of each job: its echoed prompt and logprobs added."""
    out = []
    for job, (text, finish) in zip(jobs, collected, strict=True):
        text, logprobs = job.choice(server.tokenizer, chat, text)
        out.append((text, finish, logprobs))
    return out


def _best(jobs: list[Job], choices: list[_Choice], n: int) -> list[_Choice]:
    """The `n` choices of each prompt with the highest log-probability per token (`best_of`), in order."""
    if len(jobs) == n * len({j.group for j in jobs}):
        return choices
    out: list[_Choice] = []
    for group in dict.fromkeys(j.group for j in jobs):
        ranked = sorted(
            (i for i, j in enumerate(jobs) if j.group == group),
            key=lambda i: -sum(lp.logprob for lp in jobs[i].logprobs) / max(1, len(jobs[i].logprobs)),
        )
        out.extend(choices[i] for i in sorted(ranked[:n]))
    return out


DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


async def _collect(server: Service, jobs: list[Job]) -> list[tuple[str, str]]:
    """(text, finish reason) of each job, in order, once all have ended."""
    parts: list[list[str]] = [[] for _ in jobs]
    finish = ["stop"] * len(jobs)
    async with contextlib.aclosing(_merged(server, jobs)) as events:
        async for index, delta, reason in events:
            parts[index].append(delta)
            finish[index] = reason or finish[index]
    return [("".join(p), f) for p, f in zip(parts, finish, strict=True)]


async def _merged(server: Service, jobs: list[Job]) -> AsyncGenerator[tuple[int, str, str | None], None]:
    """(job index, new text, finish reason or None) of all jobs, as they come; closing it closes every run.

    Each job runs in its own task; the first one that fails ends them all with its error.
    """
    queue: asyncio.Queue[tuple[int, str | None, str | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, job: Job) -> None:
        try:
            async with contextlib.aclosing(server.run(job)) as run:
                async for delta, reason in run:
                    await queue.put((index, delta, reason, None))
        except Exception as exc:
            await queue.put((index, None, None, exc))
            return
        await queue.put((index, None, None, None))  # this job has ended

    tasks = [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]
    try:
        num_running = len(jobs)
        while num_running:
            index, delta, reason, exc = await queue.get()
            if exc is not None:
                raise exc
            if delta is None:
                num_running -= 1
                continue
            yield index, delta, reason
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _usage(jobs: list[Job]) -> dict[str, Any]:
    """The usage of a request: its jobs' tokens, summed; a prompt's tokens once, however many choices."""
    firsts = {j.group: j for j in reversed(jobs)}.values()
    return fmt.usage(
        sum(len(j.prompt_ids) for j in firsts),
        sum(j.num_completion for j in jobs),
        sum(j.num_cached for j in firsts),
    )


def _reason(exc: BaseException) -> str:
    """What went wrong, in one line: the innermost cause's type and message."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


class _Once:
    """A stream's clean-up, run exactly once: after its last event, or when the stream never starts."""

    def __init__(self, server: Service, jobs: list[Job]) -> None:
        self.server, self.jobs, self.done = server, jobs, False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        for job in self.jobs:
            self.server.release()
            if job.seq_id is not None:
                self.server.llm.abort(job.seq_id)  # a no-op for a request that ended


class _EventStream(StreamingResponse):
    """An event stream whose clean-up runs however the response ends, even if it never started."""

    def __init__(self, events: AsyncIterator[str], cleanup: _Once) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.cleanup = cleanup

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.cleanup()


async def _sse(
    server: Service, chat: bool, body: CompletionRequest | ChatRequest, jobs: list[Job], rid: str, done: _Once
) -> AsyncIterator[str]:
    """Server-sent events; a client that goes away cancels this, which aborts the requests.

    Every stream ends with `data: [DONE]`, after an error event if a
    request failed once its 200 had been sent. Each choice's first chunk is
    sent even if empty (a chat's carries the assistant role).
    """
    name = server.model_name
    options = body.stream_options
    include_usage = options is not None and options.include_usage
    continuous = options is not None and options.continuous_usage_stats  # vLLM's: usage on every chunk
    started: set[int] = set()
    logprobs = [
        ChoiceLogprobs(server.tokenizer, chat) if j.params.logprobs is not None else None for j in jobs
    ]
    try:
        async with contextlib.aclosing(_merged(server, jobs)) as events:
            async for index, delta, reason in events:
                first = index not in started
                if delta or reason is not None or first:
                    job, choice_logprobs = jobs[index], logprobs[index]
                    new = choice_logprobs.next(job.output_ids, job.logprobs) if choice_logprobs else None
                    yield fmt.chunk(
                        chat,
                        rid,
                        name,
                        delta,
                        reason,
                        index=index,
                        first=first,
                        usage_=_usage(jobs) if continuous else None,
                        with_usage_field=include_usage or continuous,
                        logprobs=new,
                    )
                    started.add(index)
        if include_usage:
            yield fmt.chunk(chat, rid, name, None, None, usage_=_usage(jobs), with_usage_field=True)
    except Exception as exc:
        yield f"data: {json.dumps(_stream_error(exc).body())}\n\n"
    finally:
        await done()
    yield fmt.DONE


def _stream_error(exc: Exception) -> fmt.APIError:
    """The error event of a stream that failed after its 200: the server's own, or the engine's."""
    if isinstance(exc, fmt.APIError):
        return exc
    status = 400 if isinstance(exc, InvalidRequestError) else 500
    kind = "invalid_request_error" if status == 400 else "server_error"
    return fmt.APIError(status, f"the request failed in the engine: {_reason(exc)}", kind)


def create_app(
    engine: AsyncEngine, model: LoadedModel, config: ServerConfig, served_model_name: str | None = None
) -> FastAPI:
    """The app serving `model` through `engine`; its lifespan starts the engine and closes it.

    Clients call the model `served_model_name` (default: `model.name`). The
    engine must not be started yet: it is started on the app's event loop.
    Each of `config.public_prefixes` is registered with the engine here.
    """
    server = Service(engine, model, config, served_model_name)
    semantic.attach(server)  # the opt-in semantic response cache and its metrics
    for text in config.public_prefixes:
        for ids in public_prefix_ids(model, text):
            engine.add_public_prefix(ids)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.close(close_engine=True)  # the driver first: no step may run while the tiers close

    app = FastAPI(title="kvengine", lifespan=lifespan)
    app.state.server = server  # for make_server (its drain) and tests: requests in flight, limits
    fmt.add_error_handlers(app)
    _add_routes(app, server)
    add_token_routes(app, server)
    bodies: dict[str, type[BaseModel]] = {
        "/v1/completions": CompletionRequest,
        "/v1/chat/completions": ChatRequest,
        **TOKEN_BODIES,
    }
    declare_request_bodies(app, bodies)
    routes = frozenset(str(getattr(r, "path", "")) for r in app.routes)
    app.add_middleware(RequestMetricsMiddleware, metrics=server.metrics, routes=routes)
    return app


def _add_routes(app: FastAPI, server: Service) -> None:
    model = server.model

    @app.get("/health", responses={503: {"description": "the engine's driver has stopped"}})
    async def health() -> Any:
        """Liveness: 200 while the engine's driver runs (or has not started), 503 once it died."""
        if server.llm.state == "failed":
            reason = _reason(server.llm.error) if server.llm.error is not None else "unknown"
            return JSONResponse({"status": "failed", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/ready", responses={503: {"description": "not taking requests"}})
    async def ready() -> Any:
        """Readiness: 200 while the engine takes new requests; else 503 (starting, draining, closing, failed)."""
        state = "draining" if server.draining and server.llm.state == "running" else server.llm.state
        return JSONResponse({"status": state}, status_code=200 if state == "running" else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus metrics; served without an API key (see ServerConfig)."""
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": server.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "kvengine",
            "max_model_len": model.max_context_len,
        }
        return {"object": "list", "data": [card]}

    errors = error_responses(400, 401, 404, 408, 413, 429, 503)

    @app.post("/v1/completions", responses={**_ok(CompletionResponse), **errors})
    async def completions(request: Request) -> Any:
        salt = server.tenant(request)
        body = await server.read_body(request, CompletionRequest)
        server.check_model(body.model)
        prompts = await server.prompt_ids(body)
        jobs = [job for i, ids in enumerate(prompts) for job in server.jobs(body, ids, salt, group=i)]
        return await semantic.respond(server, False, body, jobs, request, _respond)

    @app.post("/v1/chat/completions", responses={**_ok(ChatCompletionResponse), **errors})
    async def chat_completions(request: Request) -> Any:
        salt = server.tenant(request)
        body = await server.read_body(request, ChatRequest)
        server.check_model(body.model)
        ids = await server.render_chat(body.messages)
        return await semantic.respond(server, True, body, server.jobs(body, ids, salt), request, _respond)


def _ok(model: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """A 200 that is `model` as JSON, or server-sent events with `"stream": true`."""
    return {200: {"model": model, "content": {"text/event-stream": {}}}}
