"""The OpenAI-compatible server: responses against the engine run directly, bad input, disconnects.

Most tests use a tiny random Llama with a byte-level tokenizer (ids = UTF-8
bytes), so text and token ids map one to one; the official `openai` client
runs against a real uvicorn server on the bundled model (marked `model`).
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient

from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import PRESSES, press_from_spec
from kvengine.server import create_app
from kvengine.server.serve import GracefulServer, make_server


class ByteTokenizer:
    """Token id = UTF-8 byte; no special tokens, no chat template."""

    chat_template = None
    eos_token_id = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def _engine(model: LoadedModel, prefix_cache: bool = False) -> Engine:
    return Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=prefix_cache))


@contextmanager
def _client(model: LoadedModel, prefix_cache: bool = False, **server: object) -> Iterator[TestClient]:
    engine = _engine(model, prefix_cache)
    app = create_app(AsyncEngine(engine), model, ServerConfig(**server))  # type: ignore[arg-type]
    with TestClient(app) as client:
        client.engine = engine  # type: ignore[attr-defined]
        yield client


def _reference(model: LoadedModel, prompt: str, max_tokens: int) -> str:
    """Greedy text from the engine run directly, without the server."""
    ids = list(prompt.encode())
    out = _engine(model).generate([ids], SamplingParams(max_tokens=max_tokens))[0]
    return bytes(out.output_ids).decode("utf-8", errors="replace")


def _events(text: str) -> list[dict]:
    lines = [ln[len("data: ") :] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


def test_completion_matches_engine(model: LoadedModel) -> None:
    with _client(model) as client:
        r = client.post("/v1/completions", json={"prompt": "hello world", "max_tokens": 7, "temperature": 0})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"] == _reference(model, "hello world", 7)
        assert body["choices"][0]["finish_reason"] == "length"
        usage = body["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"]) == (11, 7, 18)
        assert usage["prompt_tokens_details"]["cached_tokens"] == 0
        assert client.engine.pool.num_used_blocks == 0  # type: ignore[attr-defined]


def test_streaming_equals_non_streaming(model: LoadedModel) -> None:
    req = {"prompt": "stream me", "max_tokens": 9, "temperature": 0}
    with _client(model) as client:
        whole = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
        r = client.post(
            "/v1/completions", json={**req, "stream": True, "stream_options": {"include_usage": True}}
        )
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r.text)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == whole
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 9
    assert all(e["usage"] is None for e in events[:-1])


def test_chat_stream_and_stop_string(model: LoadedModel) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    prompt = "system: be brief\nuser: hi\nassistant:"
    full = _reference(model, prompt, 12)
    stop = full[4:6]
    assert stop and stop not in full[:5]  # the stop string first occurs at offset 4
    with _client(model) as client:
        r = client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 12, "temperature": 0}
        )
        msg = r.json()["choices"][0]
        assert msg["message"] == {"role": "assistant", "content": full}
        r = client.post(
            "/v1/chat/completions",
            json={"messages": messages, "max_tokens": 12, "temperature": 0, "stop": [stop], "stream": True},
        )
        events = _events(r.text)
        assert events[0]["choices"][0]["delta"]["role"] == "assistant"
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == full[:4]
        assert events[-1]["choices"][0]["finish_reason"] == "stop"
        # The stop string aborted the request; the abort lands at the next step boundary.
        assert _wait_until(lambda: client.engine.pool.num_used_blocks == 0)  # type: ignore[attr-defined]


def test_prefix_cache_hits_per_tenant(model: LoadedModel) -> None:
    prompt = "a shared prefix of some length " * 2  # 62 tokens
    req = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
    with _client(model, prefix_cache=True, api_keys=("key-a", "key-b")) as client:

        def cached(key: str) -> int:
            r = client.post("/v1/completions", json=req, headers={"Authorization": f"Bearer {key}"})
            return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert cached("key-a") == 0
        hit = cached("key-a")
        assert cached("key-b") == 0  # another tenant never hits key-a's prefix
    assert 0 < hit < len(prompt) and hit % 4 == 0


def test_models_health_and_press(model: LoadedModel) -> None:
    with _client(model) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/v1/models").json()["data"][0]["id"] == model.name
        prompt = "The quick brown fox jumps over the lazy dog; " * 2
        req = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        r = client.post("/v1/completions", json={**req, "kv_press": "knorm", "kv_compression_ratio": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    # Reference: the engine run directly with the same press; knorm changes the answer, so a
    # server that ignored `kv_press` would answer the plain reference instead.
    engine = _engine(model)
    press = press_from_spec("knorm", 0.5)
    seq_id = engine.add_request(list(prompt.encode()), SamplingParams(max_tokens=8), press=press)
    while engine.has_unfinished():
        engine.step()
    pressed = bytes(engine.release(seq_id).output_ids).decode("utf-8", errors="replace")
    assert r.json()["choices"][0]["text"] == pressed != _reference(model, prompt, 8)


def _bad_cases() -> list[tuple[str, dict, bytes, int, str | None]]:
    ok = {"prompt": "hi", "max_tokens": 2}
    j = json.dumps
    return [
        ("malformed json", {}, b'{"prompt": "hi",', 400, None),
        ("invalid utf-8", {}, b'{"prompt": "\xff\xfe"}', 400, None),
        ("not an object", {}, b"[1, 2]", 400, None),
        ("wrong type", {}, j({**ok, "max_tokens": "2"}).encode(), 400, "max_tokens"),
        ("prompt type", {}, j({"prompt": {"a": 1}}).encode(), 400, "prompt"),
        ("missing prompt", {}, j({"max_tokens": 2}).encode(), 400, "prompt"),
        ("zero max_tokens", {}, j({**ok, "max_tokens": 0}).encode(), 400, "max_tokens"),
        ("negative max_tokens", {}, j({**ok, "max_tokens": -5}).encode(), 400, "max_tokens"),
        ("over max_tokens limit", {}, j({**ok, "max_tokens": 10**6}).encode(), 400, "max_tokens"),
        ("n=0", {}, j({**ok, "n": 0}).encode(), 400, "n"),
        ("unknown press", {}, j({**ok, "kv_press": "nope"}).encode(), 400, "kv_press"),
        ("bad ratio", {}, j({**ok, "kv_press": "knorm", "kv_compression_ratio": 1.5}).encode(), 400, None),
        ("seed too large for torch", {}, j({**ok, "seed": 2**70}).encode(), 400, "seed"),
        ("top_k too large", {}, j({**ok, "top_k": 10**30}).encode(), 400, "top_k"),
        ("empty stop string", {}, j({**ok, "stop": [""]}).encode(), 400, None),
        ("negative temperature", {}, j({**ok, "temperature": -1}).encode(), 400, "temperature"),
        ("prompt too long", {}, j({**ok, "prompt": "x" * 300}).encode(), 400, "prompt"),
        ("token id out of range", {}, j({**ok, "prompt": [1, 999]}).encode(), 400, "prompt"),
        ("streamed, out of range", {}, j({**ok, "prompt": [999], "stream": True}).encode(), 400, "prompt"),
        ("empty prompt", {}, j({**ok, "prompt": ""}).encode(), 400, "prompt"),
        ("wrong model", {}, j({**ok, "model": "gpt-9"}).encode(), 404, "model"),
        ("huge body", {}, j({**ok, "pad": "x" * 5000}).encode(), 413, None),
        ("no key", {"authorization": ""}, j(ok).encode(), 401, None),
        ("wrong key", {"authorization": "Bearer nope"}, j(ok).encode(), 401, None),
    ]


def test_bad_input_gives_4xx_with_error_body(model: LoadedModel) -> None:
    server = dict(api_keys=("k1",), max_prompt_tokens=200, max_tokens_limit=64, max_body_bytes=4000)
    with _client(model, **server) as client:
        for name, headers, data, status, param in _bad_cases():
            headers = {"authorization": "Bearer k1", "content-type": "application/json", **headers}
            r = client.post("/v1/completions", content=data, headers=headers)
            assert r.status_code == status, (name, r.text)
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and err["message"], name
            if param is not None:
                assert err["param"] is not None and err["param"].startswith(param), (name, err)
        r = client.post(
            "/v1/completions",
            json={"prompt": "hi", "kv_press": "nope"},
            headers={"authorization": "Bearer k1"},
        )
        assert all(p in r.json()["error"]["message"] for p in PRESSES)  # names the known presses
        assert (
            client.post(
                "/v1/chat/completions", json={"messages": []}, headers={"authorization": "Bearer k1"}
            ).status_code
            == 400
        )
        assert client.get("/v1/nothing").status_code == 404
        assert client.get("/v1/nothing").json()["error"]["type"] == "not_found_error"
        r = client.post(
            "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, headers={"authorization": "Bearer k1"}
        )
        assert r.status_code == 200


def test_server_config_is_validated() -> None:
    for bad in (dict(port=-1), dict(max_body_bytes=0), dict(api_keys=("",)), dict(max_tokens_limit=0)):
        with pytest.raises(InvalidRequestError):
            ServerConfig(**bad)  # type: ignore[arg-type]


@contextmanager
def _live_server(model: LoadedModel, engine: Engine, **config: object) -> Iterator[str]:
    """A real uvicorn server on a free loopback port, in a background thread."""
    with _live(model, engine, **config) as (url, _):
        yield url


@contextmanager
def _live(model: LoadedModel, engine: Engine, **config: object) -> Iterator[tuple[str, GracefulServer]]:
    """`_live_server`'s URL and server: `server.handle_exit(SIGTERM, None)` shuts it down as a signal does."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server_config = ServerConfig(port=port, **config)  # type: ignore[arg-type]
    app = create_app(AsyncEngine(engine), model, server_config)
    server = make_server(app, server_config, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def _wait_until(cond: object, timeout_s: float = 10.0) -> bool:
    """Poll `cond()` until true; the deadline only bounds a failing test, it is not a timing check."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_disconnect_mid_stream_frees_blocks(model: LoadedModel) -> None:
    engine = _engine(model)
    aborted: list[int] = []
    abort = engine.abort
    engine.abort = lambda seq_id: (aborted.append(seq_id), abort(seq_id))[-1]  # type: ignore[method-assign]
    with _live_server(model, engine) as url:
        req = {"prompt": "go on and on", "max_tokens": 1000, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=req, timeout=30) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            assert engine.pool.num_used_blocks > 0  # the request holds blocks while it streams
        assert _wait_until(lambda: engine.pool.num_used_blocks == 0 and not engine.sequences)
        assert len(aborted) == 1  # freed by the abort, not by running to max_tokens
        engine.pool.check_invariants()


def test_concurrency_limit_answers_429(model: LoadedModel) -> None:
    req = {"prompt": "hi", "max_tokens": 1}
    with _client(model, max_concurrent_requests=2) as client:
        server = client.app.state.server  # type: ignore[attr-defined]
        server.num_in_flight = 2  # as if two streams were open
        r = client.post("/v1/completions", json=req)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        server.num_in_flight = 1
        assert client.post("/v1/completions", json=req).status_code == 200
        assert client.post("/v1/completions", json={**req, "stream": True}).status_code == 200
        assert server.num_in_flight == 1  # both gave their slot back


@pytest.mark.model
def test_openai_client_on_bundled_model(bundled: LoadedModel) -> None:
    import openai

    engine = Engine(bundled, CacheConfig(max_kv_bytes=2**26, prefix_cache=True))
    with _live_server(bundled, engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == [bundled.name]
        chat = client.chat.completions.create(
            model=bundled.name,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=8,
            temperature=0,
        )
        assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
        comp = client.completions.create(
            model=bundled.name, prompt="The capital of France is", max_tokens=5, temperature=0
        )
        assert comp.choices[0].text and comp.usage.prompt_tokens > 0
        stream = client.chat.completions.create(
            model=bundled.name,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == chat.choices[0].message.content  # greedy: same text streamed or not
        assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=bundled.name, prompt="x", max_tokens=-1)


def test_a_press_that_cannot_fit_is_a_400_and_the_server_keeps_serving(model: LoadedModel) -> None:
    with _client(model) as client:
        req = {"prompt": "hi", "kv_press": "streaming_llm", "kv_compression_ratio": 0.5}
        for stream in (False, True):  # the engine refuses it before any response starts
            r = client.post("/v1/completions", json={**req, "stream": stream})
            assert r.status_code == 400 and "sink tokens do not fit" in r.json()["error"]["message"]
        assert client.app.state.server.num_in_flight == 0  # type: ignore[attr-defined]
        r = client.post("/v1/completions", json={"prompt": "hi there", "max_tokens": 2})
        assert r.status_code == 200, r.text


class _ClosingEngine(Engine):
    """Records what the engine looked like when the app closed it."""

    closed_with: list[tuple[int, int]]

    def close(self) -> None:
        self.closed_with.append((len(self.sequences), self.pool.num_used_blocks))
        super().close()


def test_shutdown_closes_the_engine_after_the_driver(model: LoadedModel) -> None:
    engine = _ClosingEngine(model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=True))
    engine.closed_with = []
    app = create_app(AsyncEngine(engine), model, ServerConfig())
    with TestClient(app) as client:
        assert client.post("/v1/completions", json={"prompt": "hi there", "max_tokens": 2}).status_code == 200
        assert engine.closed_with == []
    assert engine.closed_with == [(0, engine.pool.num_used_blocks)]  # once, with no request left


def _post(client: TestClient, key: str, route: str, body: dict) -> int:
    """The response's cached prompt tokens."""
    r = client.post(route, json={**body, "max_tokens": 1}, headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def _public_prefix_case(client: TestClient, public: str, block_size: int, public_len: dict[str, int]) -> None:
    """Tenants share the public prefix's whole blocks, and nothing else."""

    def chat(question: str) -> dict:
        return {"messages": [{"role": "system", "content": public}, {"role": "user", "content": question}]}

    for route, body_a, body_b in (
        ("/v1/chat/completions", chat("first question"), chat("other question")),
        ("/v1/completions", {"prompt": public + " and tenant a's text"}, {"prompt": public + " b's text"}),
    ):
        assert _post(client, "key-a", route, body_a) == 0
        shared = _post(client, "key-b", route, body_b)
        assert 0 < shared <= public_len[route], route  # from the public part only
        assert shared == public_len[route] // block_size * block_size, route
    private = {"prompt": "Private words that no public prefix starts with. " * 2}
    assert _post(client, "key-a", "/v1/completions", private) == 0
    assert _post(client, "key-b", "/v1/completions", private) == 0  # not public: never another tenant's
    assert _post(client, "key-a", "/v1/completions", private) > 0  # the same tenant's, yes


def test_public_prefix_is_shared_across_tenants(model: LoadedModel) -> None:
    public = "You are a helpful assistant of a shared deployment."
    config = dict(api_keys=("key-a", "key-b"), public_prefixes=(public,))
    with _client(model, prefix_cache=True, **config) as client:
        lens = {"/v1/chat/completions": len(f"system: {public}\n"), "/v1/completions": len(public)}
        _public_prefix_case(client, public, 4, lens)


@pytest.mark.model
def test_public_prefix_on_bundled_model(bundled: LoadedModel) -> None:
    from kvengine.server.tenancy import public_prefix_ids

    public = "You are a careful assistant. Answer in one short sentence, and say so when unsure. " * 3
    chat_ids, plain_ids = public_prefix_ids(bundled, public)
    engine = Engine(bundled, CacheConfig(max_kv_bytes=2**26, prefix_cache=True))
    config = ServerConfig(api_keys=("key-a", "key-b"), public_prefixes=(public,))
    with TestClient(create_app(AsyncEngine(engine), bundled, config)) as client:
        lens = {"/v1/chat/completions": len(chat_ids), "/v1/completions": len(plain_ids)}
        _public_prefix_case(client, public, engine.cache_config.block_size, lens)


def test_public_prefixes_need_the_prefix_cache(model: LoadedModel) -> None:
    with pytest.raises(InvalidRequestError, match="prefix cache"):
        create_app(AsyncEngine(_engine(model)), model, ServerConfig(public_prefixes=("shared",)))
    with pytest.raises(InvalidRequestError):
        ServerConfig(public_prefixes=("",))
