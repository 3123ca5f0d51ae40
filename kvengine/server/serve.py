"""The app under uvicorn: `make_server`, with a graceful shutdown and a deadline on request headers.

`kvengine serve` runs what `make_server` builds. It is uvicorn's server with two changes:

- **Graceful shutdown.** On SIGTERM, uvicorn alone stops listening at once
  and, after `timeout_graceful_shutdown`, cancels the responses still
  running, which cuts a stream with no final event. Here the first SIGTERM
  or SIGINT drains the app instead (`Service.drain`): the server keeps
  listening, answers new completion requests 503 and /ready 503 (so that a
  load balancer moves on), gives the requests in flight
  `ServerConfig.shutdown_grace_s` to finish, and ends the rest (an error
  event and `data: [DONE]` in a stream, a 503 otherwise). Only then does
  uvicorn's own shutdown run, and the app's lifespan closes the engine,
  which flushes its storage tiers. A second signal is uvicorn's: stop now.
- **A deadline on headers.** uvicorn's h11 protocol bounds the size of a
  request's headers (`h11_max_incomplete_event_size`, 16 KiB by default)
  and how long a keep-alive connection may idle (`timeout_keep_alive`),
  but not how long headers may take: a client that sends a header byte now
  and then (slow loris), or connects and sends nothing, holds its
  connection for good. `HeaderDeadlineH11Protocol` gives each request's
  headers `ServerConfig.header_timeout_s` from the connection's start (or
  the previous response's end), then answers 408 and closes. This also
  closes a connection whose body was refused (408, 413) while its client
  goes on sending it: what arrives after a response is not a new request.

Read timeouts, all told: headers here, bodies in `Service.read_body`
(`body_timeout_s`, one deadline for the whole body), idle keep-alive
connections by uvicorn. Not covered: a client that reads its response
slowly (it holds its own request, whose output is bounded by `max_tokens`),
the number of open connections (uvicorn's `limit_concurrency`, or a proxy
in front), TLS handshakes, HTTP/2 and websockets (none are served).
"""

from __future__ import annotations

import asyncio
import logging
from types import FrameType
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from kvengine.config import ServerConfig
from kvengine.engine.engine import Engine
from kvengine.server.service import Service

logger = logging.getLogger("uvicorn.error")

# uvicorn's own graceful shutdown, once the app has drained: a bound on sending the last bytes
# to clients that read slowly, after which their responses are cancelled.
_BACKSTOP_S = 5
_REQUEST_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class HeaderDeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers take over `header_timeout_s`.

    The deadline starts when the connection is made and again when a
    response is complete (for the next request on a keep-alive connection),
    and stops once a request's headers are parsed; the body has its own
    deadline (`Service.read_body`). A subclass sets `header_timeout_s`.
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_deadline()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's headers were parsed: its cycle began
            self._stop_deadline()

    def on_response_complete(self) -> None:
        self._start_deadline()  # first: a pipelined request parsed in there stops it again
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        super().connection_lost(exc)

    def _start_deadline(self) -> None:
        self._stop_deadline()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.conn.our_state is h11.IDLE:  # no response begun: say why before closing
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()


class GracefulServer(uvicorn.Server):
    """uvicorn's server, whose first SIGTERM or SIGINT drains the app before shutting down.

    `handle_exit` is uvicorn's signal handler; it may also be called from
    another thread (tests). The drain runs on the server's event loop, started
    by the main loop's next tick (every 0.1 s).
    """

    def __init__(self, config: uvicorn.Config, service: Service, grace_s: float) -> None:
        super().__init__(config)
        self.service = service
        self.grace_s = grace_s
        self.drain_requested = False
        self._drain: asyncio.Task[int] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_requested:
            super().handle_exit(sig, frame)  # a second signal: uvicorn's shutdown, now
        else:
            self.drain_requested = True  # only a flag: a signal handler must not touch the event loop

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain is None:
            logger.info(
                "Draining: %d requests in flight get %g s to finish", self.service.num_in_flight, self.grace_s
            )
            self._drain = asyncio.create_task(self.service.drain(self.grace_s))
        if self._drain is not None and self._drain.done():
            if self._drain.exception() is not None:  # the shutdown goes on: the lifespan closes the engine
                logger.error("Draining failed", exc_info=self._drain.exception())
            else:
                logger.info("Drained: %d requests ended before they finished", self._drain.result())
            return True
        return await super().on_tick(counter)


def make_server(app: FastAPI, config: ServerConfig, **uvicorn_options: Any) -> GracefulServer:
    """The server for `app` (from `create_app`) at `config.host:config.port`; `.run()` serves until stopped.

    `uvicorn_options` go to `uvicorn.Config` (e.g. `log_level`).
    """
    protocol = type(
        "HeaderDeadlineH11Protocol",
        (HeaderDeadlineH11Protocol,),
        {"header_timeout_s": config.header_timeout_s},
    )
    options: dict[str, Any] = {"timeout_graceful_shutdown": _BACKSTOP_S, **uvicorn_options}
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, http=protocol, ws="none", **options)
    return GracefulServer(uv_config, app.state.server, config.shutdown_grace_s)


def startup_line(engine: Engine, served_model_name: str) -> str:
    """What a server starts with, in one log line: model, dtype, device, KV pool, prefix cache."""
    model, cache = engine.model, engine.cache_config
    pool = engine.pool
    kv = f"{pool.capacity_bytes / 2**20:.0f} MiB in {pool.num_blocks} blocks of {pool.block_size} tokens"
    if cache.kv_bits:
        kv += f", KIVI {cache.kv_bits}-bit"
    prefix = "off"
    if cache.prefix_cache:
        prefix = f"on, eviction {cache.eviction_policy}"
        if cache.tiers:
            prefix += f", tiers {cache.tiers} (write-{cache.tier_write})"
    return (
        f"Serving {model.name} as {served_model_name!r}: {model.num_layers} layers, "
        f"dtype {str(model.dtype).removeprefix('torch.')} ({model.dtype_reason}), "
        f"{'' if model.weights == 'model' else f'weights {model.weights}, '}"
        f"device {model.hf_model.device}; KV pool {kv}; prefix cache {prefix}"
    )
