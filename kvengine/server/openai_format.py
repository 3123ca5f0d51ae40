"""OpenAI's wire format: error bodies, completion objects, stream chunks, usage.

Pure functions of what they are given; the app decides what to send when.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from kvengine.models import LoadedModel
from kvengine.server.schemas import ChatMessage


class APIError(Exception):
    """A request the server refuses, answered with `status` and OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _error_response(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if exc.status == 503:  # the server is going away: a client should not reuse the connection
        headers["Connection"] = "close"
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers or None)


def add_error_handlers(app: FastAPI) -> None:
    """Every error, the app's own and the framework's (404, 405), answered in OpenAI's error body."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return _error_response(exc)

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, str(exc.detail), kind))

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(400, str(exc)))

    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # Only a bug gets here: client input is answered with a 4xx before the engine sees it.
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}", "server_error"))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(num_prompt: int, num_completion: int, num_cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt,
        "completion_tokens": num_completion,
        "total_tokens": num_prompt + num_completion,
        "prompt_tokens_details": {"cached_tokens": num_cached},
    }


def completion_object(
    chat: bool,
    rid: str,
    model: str,
    choices: list[tuple[str, str, dict[str, Any] | None]],
    usage_: dict[str, Any],
) -> dict[str, Any]:
    """The whole response of a non-streaming request; `choices` are (text, finish reason, logprobs), in order."""
    out = []
    for index, (text, finish, logprobs) in enumerate(choices):
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        out.append(choice)
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": out,
        "usage": usage_,
    }


def chunk(
    chat: bool,
    rid: str,
    model: str,
    text: str | None,
    finish: str | None,
    *,
    index: int = 0,
    first: bool = False,
    usage_: dict[str, Any] | None = None,
    with_usage_field: bool = False,
    logprobs: dict[str, Any] | None = None,
) -> str:
    """One server-sent event of choice `index`. `text=None` makes the usage-only chunk (no choices)."""
    choices: list[dict[str, Any]] = []
    if text is not None:
        choice: dict[str, Any] = {"index": index, "logprobs": logprobs, "finish_reason": finish}
        if chat:
            choice["delta"] = {"role": "assistant", "content": text} if first else {"content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    obj: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if with_usage_field:  # OpenAI sends "usage": null on every chunk but the last when usage is asked for
        obj["usage"] = usage_
    return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"


def render_chat(
    model: LoadedModel, messages: list[ChatMessage], add_generation_prompt: bool = True
) -> list[int]:
    """Token ids of a conversation, up to the assistant's turn (or its own end, without it).

    Uses the model's chat template; a model without one gets a plain
    "role: content" transcript, so that base models can still be chatted with.
    """
    tok = model.tokenizer
    assert tok is not None  # create_app refuses models without a tokenizer
    plain = [_message(m) for m in messages]
    if model.has_chat_template:
        text = str(
            tok.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=False)
        )
        return list(tok.encode(text, add_special_tokens=False))
    text = "".join(f"{m['role']}: {m['content']}\n" for m in plain)
    return list(tok.encode(text + "assistant:" if add_generation_prompt else text))


def _message(m: ChatMessage) -> dict[str, str]:
    """A message as chat templates take it: role and content, and `name` or `tool_call_id` if sent."""
    out = {"role": m.role, "content": m.text()}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
