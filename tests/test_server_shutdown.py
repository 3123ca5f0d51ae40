"""Graceful shutdown and read timeouts of a real uvicorn server (in this process, on a tiny model).

A shutdown signal must not cut a stream: new requests get 503, requests in
flight finish within the grace period or end with an error event and
`data: [DONE]` (a 503 when not streaming), and the engine is closed after
them. A client that sends its headers or body too slowly is answered 408 and
cut, and holds no connection meanwhile. The reference for a shutdown is what
each request would get from a server that is not shutting down: its whole
output.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import socket
import threading
import time

import httpx
import pytest
from conftest import tiny_model
from test_server import ByteTokenizer, _engine, _live, _live_server, _wait_until

from kvengine.config import ServerConfig
from kvengine.engine.engine import Engine
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def _slow(engine: Engine, step_s: float) -> Engine:
    """`engine`, each step made `step_s` longer, so that requests are still running when a test acts."""
    step = engine.step

    def slow_step() -> list:
        time.sleep(step_s)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    return engine


def _stream(url: str, max_tokens: int, out: list[list[str]]) -> None:
    """Stream a completion; append its `data:` payloads, or ["cut"] if the connection broke first."""
    req = {"prompt": "go on", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    lines: list[str] = []
    try:
        with httpx.stream("POST", url + "/v1/completions", json=req, timeout=30) as r:
            lines += [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    except httpx.HTTPError:
        lines.append("cut")
    out.append(lines)


def _post(url: str, max_tokens: int, out: list[httpx.Response | None]) -> None:
    req = {"prompt": "go on", "max_tokens": max_tokens, "ignore_eos": True}
    try:
        out.append(httpx.post(url + "/v1/completions", json=req, timeout=30))
    except httpx.HTTPError:
        out.append(None)


def test_sigterm_drains_then_ends_what_is_left(model: LoadedModel) -> None:
    engine = _slow(_engine(model), 0.01)
    closed: list[bool] = []
    close = engine.close
    engine.close = lambda: (closed.append(True), close())[-1]  # type: ignore[method-assign]
    short: list[list[str]] = []
    long: list[list[str]] = []
    plain: list[httpx.Response | None] = []
    with _live(model, engine, shutdown_grace_s=2.0) as (url, server):
        threads = [threading.Thread(target=_stream, args=(url, 5, short)) for _ in range(2)]
        threads += [threading.Thread(target=_stream, args=(url, 600, long)) for _ in range(2)]
        threads.append(threading.Thread(target=_post, args=(url, 600, plain)))
        for t in threads:
            t.start()
        service = server.service
        assert _wait_until(lambda: service.num_in_flight == 5)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        assert _wait_until(lambda: service.draining)
        ready = httpx.get(url + "/ready", timeout=10)
        refused = httpx.post(url + "/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=10)
        for t in threads:
            t.join(timeout=30)
        assert _wait_until(lambda: closed == [True])  # the server shut down on its own, after them
    assert ready.status_code == 503 and ready.json()["status"] == "draining"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutdown"
    for lines in short:  # finished within the grace period: the whole output
        assert lines[-1] == "[DONE]" and json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"
    for lines in long:  # still running at its end: an error event, then [DONE]
        assert lines[-1] == "[DONE]", lines[-3:]
        assert json.loads(lines[-2])["error"]["code"] == "shutdown"
        assert 0 < len(lines) - 2 < 600  # some tokens went out before
    assert plain[0] is not None and plain[0].status_code == 503, plain
    assert plain[0].json()["error"]["code"] == "shutdown"
    assert engine.pool.num_used_blocks == 0 and not engine.sequences


def _exchange(url: str, first: bytes, drip: bytes, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Send `first`, then `drip` every 0.1 s until the server closes; (what it sent back, seconds taken).

    Stops after `limit_s` if the server never closes: then the test fails on the time.
    """
    host, port = url.removeprefix("http://").split(":")
    start = time.monotonic()
    received = b""
    with socket.create_connection((host, int(port))) as sock:
        sock.settimeout(0.1)
        sock.sendall(first)
        while time.monotonic() - start < limit_s:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(drip)
                except OSError:
                    break
                continue
            except OSError:
                break
            if not chunk:
                break
            received += chunk
    return received, time.monotonic() - start


HEADERS = b"POST /v1/completions HTTP/1.1\r\nHost: kvengine\r\n"


def test_slow_headers_are_cut_and_others_are_served(model: LoadedModel) -> None:
    with _live_server(model, _engine(model), header_timeout_s=0.5) as url:
        got, took = _exchange(url, HEADERS, b"X-Slow: 1\r\n")  # a slow loris: one header at a time
        assert got.startswith(b"HTTP/1.1 408") and took < 3.0, (got, took)
        got, took = _exchange(url, b"", b"")  # connected, never says a word
        assert took < 3.0, took
        # On a keep-alive connection, the next request's headers have the same deadline.
        got, took = _exchange(
            url, b"GET /health HTTP/1.1\r\nHost: kvengine\r\n\r\n" + HEADERS, b"X-Slow: 1\r\n"
        )
        assert got.startswith(b"HTTP/1.1 200") and b"HTTP/1.1 408" in got and took < 3.0, (got, took)
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200


def test_slow_body_is_a_408(model: LoadedModel) -> None:
    # The connection closes at the next request's header deadline: what the client still sends is not headers.
    with _live_server(model, _engine(model), body_timeout_s=0.5, header_timeout_s=0.5) as url:
        head = HEADERS + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        got, took = _exchange(url, head + b'{"prompt": "', b"a")
        assert got.startswith(b"HTTP/1.1 408") and took < 3.0, (got, took)
        body = json.loads(got.split(b"\r\n\r\n", 1)[1])
        assert body["error"]["code"] == "request_timeout"
        r = httpx.post(url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 200


@pytest.mark.parametrize("name", ["header_timeout_s", "body_timeout_s", "shutdown_grace_s"])
def test_timeouts_must_be_positive(name: str) -> None:
    for bad in (0, -1.0):
        with pytest.raises(InvalidRequestError):
            ServerConfig(**{name: bad})  # type: ignore[arg-type]
