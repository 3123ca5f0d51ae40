"""Relaying a replica's answer through the ingress: the response head, the body, and a replica that dies.

`head` reads a replica's streamed answer (kvengine/cluster/replica.py's
messages) up to its status, headers and first non-empty body chunk, raising
`ReplicaGoneError` if the replica died before that: nothing has reached the
client yet, so the ingress may send the request elsewhere. `rest` relays the
remaining body and, if the replica dies mid-response, ends it with an error
event and `data: [DONE]` (the status was already sent). `replica_reports`
gathers every engine replica's report (for /metrics) from the replica actors
themselves. These live outside ingress.py because Ray ships the ingress class
by value, with copies of the globals it names.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

ENGINE_DEPLOYMENT = "EngineReplica"
SERVE_NAMESPACE = "serve"
HOP_HEADERS = {b"content-length", b"transfer-encoding", b"connection"}  # set again by the ingress's server
_REPLICA_GONE = (RayActorError, ActorUnavailableError)


class ReplicaGoneError(Exception):
    """The replica died before any byte of its answer's body was relayed."""


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error object for a server-side failure."""
    return {"error": {"message": message, "type": "server_error", "param": None, "code": status}}


async def head(gen: Any) -> tuple[dict[str, Any], list[bytes]]:
    """The response start and the body chunks up to the first non-empty one; _ReplicaGone if it died."""
    head: dict[str, Any] | None = None
    chunks: list[bytes] = []
    try:
        async for message in gen:
            if "start" in message:
                head = message
                continue
            chunks.append(message["body"])
            if message["body"]:
                break
    except _REPLICA_GONE as exc:
        raise ReplicaGoneError() from exc
    if head is None:
        raise ReplicaGoneError()
    return head, chunks


async def rest(gen: Any, first: list[bytes]) -> AsyncIterator[bytes]:
    """The body: what `head` read, then the rest; an error event and [DONE] if the replica dies."""
    for chunk in first:
        yield chunk
    try:
        async for message in gen:
            if message.get("body"):
                yield message["body"]
    except _REPLICA_GONE:
        error = error_body(503, "the engine replica serving this request stopped mid-response")
        yield f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()
    finally:
        gen.cancel()


async def replica_reports(app_name: str, timeout_s: float = 5.0) -> dict[str, dict[str, Any]]:
    """Each live engine replica's report (`record_routing_stats`), by replica id; silent ones left out."""
    marker = f"{app_name}#{ENGINE_DEPLOYMENT}#"
    names = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == SERVE_NAMESPACE and marker in a["name"]
    ]

    async def one(name: str) -> dict[str, Any] | None:
        try:
            actor = ray.get_actor(name, namespace=SERVE_NAMESPACE)
            return dict(await asyncio.wait_for(actor.record_routing_stats.remote(), timeout_s))
        except (TimeoutError, RayError, ValueError):
            return None  # dead or starting: not a live replica now

    found = await asyncio.gather(*(one(n) for n in names))
    return {n.rsplit("#", 1)[1]: r for n, r in zip(names, found, strict=True) if r is not None}
