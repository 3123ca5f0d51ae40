"""One engine replica of the cluster: kvengine's own server app, called in process, and its reports.

`EngineReplica` is the class Ray Serve runs N copies of (launch.py wraps it in
`serve.deployment`). Each copy loads the model, builds an `Engine` and the
same FastAPI app `kvengine serve` runs (`kvengine.server.create_app`), and
answers requests the ingress forwards by calling that app as an ASGI
application: routes, auth, limits, errors and streaming are the single
server's. `record_routing_stats` is the replica's report to the router (Ray
calls it every few seconds): the routing keys it served, bounded by an
estimate of what its prefix cache can hold, and its counters. The class does
not import Ray, so it also runs (and is tested) without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from kvengine.cluster.prefix_tree import PrefixTree, RoutingKey
from kvengine.cluster.routing import LOAD_FALLBACK
from kvengine.config import CacheConfig, SchedulerConfig, ServerConfig

CHARS_PER_TOKEN = 3  # to size the replica's ledger of routing chunks from its pool's tokens


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads and how it serves: one per cluster, shipped to each replica."""

    model: str
    dtype: str = "auto"
    device: str = "auto"  # models/device.py
    weights: str = "model"  # "int8": weight-only int8 (engine/linear.py)
    served_model_name: str | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    chunk_chars: int = 64  # of routing keys (kvengine/cluster/keys.py)


def ledger_capacity(stats: dict[str, float], num_layers: int, num_kv_heads: int, spec: ReplicaSpec) -> int:
    """Routing chunks the replica's pool holds, about: pool tokens times characters per token, over a chunk."""
    blocks_per_token_block = max(1, num_layers * num_kv_heads)  # a pool block is one (layer, kv-head)
    tokens = stats.get("pool_blocks", 0) / blocks_per_token_block * spec.cache.block_size
    return max(1, int(tokens * CHARS_PER_TOKEN / spec.chunk_chars))


class EngineReplica:
    """A kvengine engine and its HTTP app, answering forwarded requests (see module docstring)."""

    def __init__(self, spec: ReplicaSpec) -> None:
        from kvengine.engine.async_engine import AsyncEngine
        from kvengine.engine.engine import Engine
        from kvengine.models import load
        from kvengine.server import create_app

        model = load(spec.model, dtype=spec.dtype, device=spec.device, weights=spec.weights, progress=False)
        self.engine = Engine(model, spec.cache, spec.scheduler)
        self.app = create_app(AsyncEngine(self.engine), model, spec.server, spec.served_model_name)
        config = model.hf_model.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        capacity = ledger_capacity(self.engine.stats(), config.num_hidden_layers, kv_heads, spec)
        self.ledger = PrefixTree(capacity)
        self.instance = uuid.uuid4().hex[:12]  # a restarted replica is a new instance
        self.num_requests = 0
        self.decisions: Counter[str] = Counter()  # routing decisions that sent requests here
        self.in_flight = 0
        self._lifespan: contextlib.AbstractAsyncContextManager[Any] | None = None
        self._start_lock = asyncio.Lock()

    async def _started(self) -> None:
        """Run the app's lifespan (it starts the engine's driver) once, on the serving event loop."""
        async with self._start_lock:
            if self._lifespan is None:
                lifespan = self.app.router.lifespan_context(self.app)
                await lifespan.__aenter__()
                self._lifespan = lifespan

    async def handle_http(
        self,
        method: str,
        path: str,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        key: Any = None,
        route: Any = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Answer one HTTP request with the server app: a `start` message, then `body` chunks.

        `key` is the request's routing key as (tenant, blocks), or None; it goes
        into the ledger the replica reports. `route` is the router's decision
        (replica, reason); a request the router meant for another replica counts
        as a load fallback (Ray sent it here because that one was full).
        """
        await self._started()
        if route is not None:
            self.decisions[route[1] if route[0] == self.instance else LOAD_FALLBACK] += 1
        if key is not None and key[1]:
            self.ledger.insert(RoutingKey(str(key[0]), tuple(key[1])))
        self.num_requests += 1
        self.in_flight += 1
        try:
            async for message in call_asgi(self.app, method, path, query, headers, body):
                if "start" in message:  # which replica answered: for clients, logs and tests
                    message["headers"].append((b"x-kvengine-replica", self.instance.encode()))
                yield message
        finally:
            self.in_flight -= 1

    def record_routing_stats(self) -> dict[str, Any]:
        """The report the router reads: held keys, counters, engine stats (JSON-friendly values)."""
        stats = self.engine_stats()
        return {
            "instance": self.instance,
            "keys": [[k.tenant, list(k.blocks)] for k in self.ledger.held_keys()],
            "requests": self.num_requests,
            "decisions": dict(self.decisions),
            "in_flight": self.in_flight,
            "prefix_queries": stats.get("prompt_tokens_total", 0),
            "prefix_hits": stats.get("prefix_hit_tokens_total", 0),
            "prefix_tier_hits": stats.get("prefix_tier_hit_tokens_total", 0),
        }

    def engine_stats(self) -> dict[str, float]:
        llm = self.app.state.server.llm
        return dict(llm.stats())

    async def close(self) -> None:
        """Stop the engine (the app's lifespan exit): what runs is aborted, tiers are flushed."""
        if self._lifespan is not None:
            lifespan, self._lifespan = self._lifespan, None
            await lifespan.__aexit__(None, None, None)


async def call_asgi(
    app: Any, method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> AsyncIterator[dict[str, Any]]:
    """Run one HTTP request through an ASGI app; yield {"start": status, headers} then {"body": bytes}.

    Closing the iterator early is the client leaving: the app sees
    `http.disconnect` and its task is cancelled.
    """
    sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if not received:
            received = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await sent.put(message)

    scope = _http_scope(method, path, query, headers)
    task = asyncio.ensure_future(app(scope, receive, send))
    try:
        while True:
            if task.done() and sent.empty():
                task.result()  # the app ended without finishing its response: raise what it raised
                return
            getter = asyncio.ensure_future(sent.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
                continue
            message = getter.result()
            if message["type"] == "http.response.start":
                yield {"start": message["status"], "headers": list(message.get("headers", []))}
            elif message["type"] == "http.response.body":
                yield {"body": bytes(message.get("body", b""))}
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _http_scope(method: str, path: str, query: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The ASGI scope of an HTTP/1.1 request from a local client."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }
