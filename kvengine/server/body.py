"""Reading a request body: size and time limits, UTF-8 JSON, then its pydantic model.

Every way a body can be wrong is a 4xx in OpenAI's error body that says what
is wrong and names the field (`param`): an unknown field, a wrong type, a
value the model refuses, or a field this server does not implement yet
(see schemas.py). Nothing here knows the engine or the model.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from kvengine.config import ServerConfig
from kvengine.server import openai_format as fmt
from kvengine.server.schemas import unsupported_field

B = TypeVar("B", bound=BaseModel)


async def read_body(request: Request, cls: type[B], config: ServerConfig) -> B:
    """The request body parsed as `cls`; 413 if too large, 400 if not UTF-8 JSON of that shape.

    408 unless the whole body arrives within `config.body_timeout_s`: one
    deadline for the body, not one per read, so a client that sends a
    byte now and then cannot hold the connection either.
    """
    limit = config.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise fmt.APIError(413, f"request body over {limit} bytes", code="request_too_large")
    data = bytearray()
    timeout_s = config.body_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                data += part
                if len(data) > limit:
                    raise fmt.APIError(413, f"request body over {limit} bytes", code="request_too_large")
    except TimeoutError:
        raise fmt.APIError(
            408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout"
        ) from None
    try:
        body = cls.model_validate(_parse_json(bytes(data)))
    except ValidationError as exc:
        raise validation_error(exc) from None
    name = unsupported_field(body)
    if name is not None:
        raise fmt.APIError(
            400, f"{name}: {getattr(body, name)!r} is not supported yet", param=name, code="not_supported"
        )
    return body


def validation_error(exc: ValidationError) -> fmt.APIError:
    """The 400 for a body its model refuses, naming the field.

    A value that matches no member of a union (a prompt that is neither text
    nor token ids) gives one error per member; those are reported as one,
    at the field, with the kinds of value it takes.
    """
    errors = exc.errors()
    first = errors[0]
    param = _dotted(first["loc"])
    if first["type"] == "extra_forbidden":
        return fmt.APIError(400, f"{param}: unknown field; this server does not accept it", param=param)
    common = _common_prefix([e["loc"] for e in errors])
    if len(errors) > 1 and common and all(len(e["loc"]) > len(common) for e in errors):
        kinds = dict.fromkeys(str(e["loc"][len(common)]) for e in errors)
        field = _dotted(common)
        return fmt.APIError(400, f"{field}: expected one of {', '.join(kinds)}", param=field)
    return fmt.APIError(400, f"{param or 'body'}: {first['msg']}", param=param or None)


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc)


def _common_prefix(locs: list[tuple[int | str, ...]]) -> tuple[int | str, ...]:
    prefix = locs[0]
    for loc in locs[1:]:
        n = 0
        while n < min(len(prefix), len(loc)) and prefix[n] == loc[n]:
            n += 1
        prefix = prefix[:n]
    return prefix


def _parse_json(data: bytes) -> Any:
    """The JSON value of a body; 400 if it is not UTF-8 JSON of valid Unicode text."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise fmt.APIError(400, f"request body is not UTF-8 (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise fmt.APIError(400, f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise fmt.APIError(400, "request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise fmt.APIError(400, f"request body is not valid JSON: {exc}") from None
    try:
        # JSON may escape lone UTF-16 surrogates ("\ud800"), which are not text: no tokenizer takes them.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise fmt.APIError(
            400, f"request body has a lone UTF-16 surrogate ({exc.reason}); send valid Unicode"
        ) from None
    except RecursionError:
        raise fmt.APIError(400, "request body is nested too deeply") from None
    return obj
