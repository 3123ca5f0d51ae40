"""The cluster's HTTP front: one Ray Serve ingress that keys, routes and relays every request.

`Ingress` receives each HTTP request on Ray Serve's proxy, computes its
routing key (the tenant salt from its API key, as the single server does, and
the prompt's block hashes; kvengine/cluster/keys.py) and forwards method,
path, headers and body to an engine replica through a deployment handle,
whose request router (ray_router.py) picks the replica. The replica's answer
(status, headers, body chunks: a JSON response or an event stream) is relayed
as it comes. Auth, validation and errors are the replica's: it runs the
single server's app. Only GET /metrics is answered here: the cluster's, from every replica's report.

A replica that dies before the first byte of a body was relayed is tried once
more on another replica (nothing was sent, so nothing is repeated); after that,
or if the replica dies mid-stream, the client gets a 503 (an error event and
`data: [DONE]` in a stream) saying so. Ray restarts the replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations at run time.
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve

from kvengine.cluster import metrics, relay
from kvengine.cluster.keys import routing_key
from kvengine.cluster.replica import ReplicaSpec
from kvengine.server import openai_format as fmt
from kvengine.server.tenancy import tenant_salt

APP = FastAPI(title="kvengine cluster")
_METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]


@serve.ingress(APP)
class Ingress:
    """Keys each request and relays it to the replica the router chooses (see module docstring)."""

    def __init__(self, engine: Any, spec: ReplicaSpec, app_name: str) -> None:
        self.engine = engine.options(stream=True)
        self.app_name = app_name
        self.spec = spec
        self.model_name = spec.served_model_name or spec.model

    @APP.get("/metrics")
    async def cluster_metrics(self) -> Response:
        reports = await relay.replica_reports(self.app_name)
        return Response(metrics.render(self.model_name, reports), media_type="text/plain")

    @APP.api_route("/{path:path}", methods=_METHODS)
    async def forward(self, request: Request, path: str) -> Response:
        body = await request.body()
        try:
            tenant = tenant_salt(self.spec.server, request)
            key = routing_key(tenant, request.url.path, body, self.spec.chunk_chars)
            raw_key: Any = [key.tenant, list(key.blocks)]
        except fmt.APIError:
            raw_key = None  # the replica answers 401; route it by load alone
        call = (
            request.method,
            request.url.path,
            request.url.query.encode(),
            request.headers.raw,
            body,
        )
        for attempt in range(2):
            gen = self.engine.handle_http.remote(*call, key=raw_key)  # the router reads `key` by name
            try:
                head, first = await relay.head(gen)
            except relay.ReplicaGoneError:
                if attempt == 0:
                    continue  # nothing reached the client: try once more
                message = "the engine replica serving this request stopped; it is being restarted"
                return JSONResponse(relay.error_body(503, message), status_code=503)
            headers = {
                k.decode(): v.decode() for k, v in head["headers"] if k.lower() not in relay.HOP_HEADERS
            }
            return StreamingResponse(relay.rest(gen, first), status_code=head["start"], headers=headers)
        raise AssertionError("unreachable")
