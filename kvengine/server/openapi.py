"""The app's OpenAPI document: request bodies that the app reads by hand, declared for clients and fuzzers.

The completion routes read and check their bodies themselves (see
`Service.read_body`), which FastAPI cannot see. Letting FastAPI parse
them instead would change what a bad request gets: it reads the whole body
before any size limit, checks the body before the API key (a 400 where a
caller without a key must get a 401), and words its errors its own way. So
the routes keep parsing by hand, and this module writes their bodies into the
document from the same pydantic models the routes validate with, so the two
cannot drift apart.

Not here: the responses, declared on the routes with FastAPI's `responses=`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from kvengine.server.schemas import ErrorResponse

_REF = "#/components/schemas/{model}"


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` entries: OpenAI's error body for each status."""
    return {status: {"model": ErrorResponse, "description": "OpenAI's error body"} for status in statuses}


def declare_request_bodies(app: FastAPI, bodies: dict[str, type[BaseModel]]) -> None:
    """Make `app.openapi()` declare a required JSON body of `bodies[path]` on each POST `path`.

    Call once, after the routes are added. The document is built on first use and cached, as FastAPI does.
    """
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = build()
        components = doc.setdefault("components", {}).setdefault("schemas", {})
        for path, model in bodies.items():
            schema = model.model_json_schema(ref_template=_REF)
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
            doc["paths"][path]["post"]["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
            }
        app.openapi_schema = doc
        return doc

    app.openapi = openapi  # type: ignore[method-assign]
