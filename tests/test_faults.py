"""Faults and abuse: nothing one request does stops the engine for the others.

Each case is one that took the server down or held it up before (issue 14):
numerically degenerate sampling parameters, a model that returns NaN for
one sequence, an exception in the middle of a step, a request cancelled
while it waits for admission, stop lists and prompts that scale work on the
event loop, malformed JSON, and a client that leaves a non-streaming
request. After each fault the next normal request must succeed and give the
same tokens as a run that never saw the fault, and no block may leak.

A tiny random Llama with a byte-level tokenizer (ids = UTF-8 bytes) keeps
every case fast.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import pytest
import torch
from conftest import tiny_model
from fastapi.testclient import TestClient
from test_server import ByteTokenizer, _live_server, _reference, _wait_until

from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.sampler import sample
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.server import create_app

POISON = 255  # a token whose embedding is NaN: the model's output for its sequence is NaN
# (so requests here that must succeed decode greedily: sampling could pick POISON as an output token)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    m = dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    with torch.no_grad():
        m.hf_model.get_input_embeddings().weight[POISON] = float("nan")
    return m


def _engine(model: LoadedModel) -> Engine:
    return Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22))


def _app(model: LoadedModel, engine: Engine, **server: object) -> TestClient:
    return TestClient(create_app(AsyncEngine(engine), model, ServerConfig(**server)))  # type: ignore[arg-type]


def _healthy(client: TestClient, model: LoadedModel, engine: Engine) -> None:
    """The next normal request succeeds with the tokens of an untouched engine; nothing leaked."""
    r = client.post("/v1/completions", json={"prompt": "after the fault", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _reference(model, "after the fault", 6)
    assert client.get("/health").status_code == 200
    assert _wait_until(lambda: engine.pool.num_used_blocks == 0)
    engine.pool.check_invariants()


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-38},
        {"temperature": 1e-300, "top_k": 3},
        {"temperature": 1.0, "top_p": 1e-300},
        {"temperature": 1e-30, "top_p": 1e-30},
    ],
)
def test_degenerate_sampling_never_stops_the_engine(model: LoadedModel, params: dict) -> None:
    engine = _engine(model)
    with _app(model, engine) as client:
        r = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 4, **params})
        assert r.status_code in (200, 400), r.text
        if r.status_code == 400:
            assert r.json()["error"]["param"] in params
        _healthy(client, model, engine)


def test_sampling_limits_are_greedy() -> None:
    """A vanishing temperature or top-p leaves only the most likely token: the greedy choice."""
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 30
    for kwargs in ({"temperature": 1e-38}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e-30}):
        try:
            params = SamplingParams(**kwargs)  # type: ignore[arg-type]
        except InvalidRequestError:
            continue  # rejected up front is fine too
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        assert sample(logits, [params] * 4, gens) == logits.argmax(-1).tolist(), kwargs


def test_nan_logits_fail_only_their_own_request(model: LoadedModel) -> None:
    engine = _engine(model)
    good = list(b"a healthy prompt")
    poisoned = [*b"poisoned ", POISON, *b" prompt"]
    expected = _engine(model).generate([good], SamplingParams(max_tokens=5))[0].output_ids
    for params in (SamplingParams(max_tokens=5), SamplingParams(max_tokens=5, temperature=0.8, seed=1)):
        bad_id = engine.add_request(poisoned, params)
        good_id = engine.add_request(good, SamplingParams(max_tokens=5))
        while not engine.sequences[good_id].is_finished:
            engine.step()
        assert engine.sequences[good_id].output_ids == expected
        bad = engine.sequences[bad_id]
        assert bad.is_finished and bad.finish_reason == "error", bad.finish_reason
        assert bad_id in engine.step_errors or bad.output_ids == []
        engine.release(bad_id)
        engine.release(good_id)
    assert engine.pool.num_used_blocks == 0


def test_nan_request_over_http_is_an_error_and_others_go_on(model: LoadedModel) -> None:
    engine = _engine(model)
    poisoned = [*b"poisoned ", POISON]
    with _app(model, engine) as client:
        r = client.post("/v1/completions", json={"prompt": poisoned, "max_tokens": 4})
        assert 500 <= r.status_code < 600 and r.json()["error"]["message"], r.text
        r = client.post("/v1/completions", json={"prompt": poisoned, "max_tokens": 4, "stream": True})
        assert r.status_code == 200
        lines = [ln for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"  # the stream ends properly
        assert any("error" in json.loads(ln[6:]) for ln in lines[:-1])  # and says why
        _healthy(client, model, engine)


def test_an_exception_inside_a_step_fails_that_step_only(model: LoadedModel) -> None:
    engine = _engine(model)
    forward = engine.runner.forward
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the forward pass")
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    engine.runner.forward = flaky  # type: ignore[method-assign]
    with _app(model, engine) as client:
        r = client.post("/v1/completions", json={"prompt": "first", "max_tokens": 3, "temperature": 0})
        assert 500 <= r.status_code < 600, r.text
        assert client.get("/health").status_code == 200  # the driver survived
        _healthy(client, model, engine)


def test_a_stream_whose_step_fails_ends_with_an_error_event(model: LoadedModel) -> None:
    engine = _engine(model)
    forward = engine.runner.forward
    calls = {"n": 0}

    def flaky(*args: object, **kwargs: object) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 3:  # after the first tokens went out
            raise RuntimeError("a bug in the forward pass")
        return forward(*args, **kwargs)  # type: ignore[arg-type]

    engine.runner.forward = flaky  # type: ignore[method-assign]
    with _app(model, engine) as client:
        req = {"prompt": "stream", "max_tokens": 8, "temperature": 0, "stream": True}
        r = client.post("/v1/completions", json=req)
        lines = [ln for ln in r.text.split("\n\n") if ln.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert "error" in json.loads(lines[-2][6:])
        _healthy(client, model, engine)


def test_request_cancelled_while_waiting_for_admission(model: LoadedModel) -> None:
    """The driver must not die setting the result of a future its caller cancelled."""
    engine = _engine(model)
    step = engine.step

    def slow_step() -> list:
        time.sleep(0.2)
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    expected = _reference(model, "later", 3)

    async def scenario() -> str:
        async with AsyncEngine(engine) as llm:
            long_id = await llm.add_request(list(b"a long one"), SamplingParams(max_tokens=20))
            await asyncio.sleep(0.05)  # the driver is inside a slow step now
            waiting = asyncio.create_task(llm.add_request(list(b"given up"), SamplingParams(max_tokens=5)))
            await asyncio.sleep(0.01)
            waiting.cancel()
            await asyncio.sleep(0.5)  # the driver applies the queued request after the step
            llm.abort(long_id)
            ids = []
            async for event in llm.generate(list(b"later"), SamplingParams(max_tokens=3)):
                ids.append(event.token_id)
            return bytes(ids).decode("utf-8", errors="replace")

    assert asyncio.run(scenario()) == expected
    assert not [s for s in engine.sequences.values() if not s.is_finished]
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize(
    "stop",
    [["ab"] * 200_000, ["x" * 100_000]],
    ids=["many stop strings", "one huge stop string"],
)
def test_stop_lists_are_bounded(model: LoadedModel, stop: list[str]) -> None:
    engine = _engine(model)
    with _app(model, engine, max_body_bytes=4 * 2**20) as client:
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stop": stop})
        assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text
        _healthy(client, model, engine)


class _LoopCheckingTokenizer(ByteTokenizer):
    """Records whether `encode` ran on a thread with a running event loop."""

    def __init__(self) -> None:
        self.on_loop: list[bool] = []

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        try:
            asyncio.get_running_loop()
            self.on_loop.append(True)
        except RuntimeError:
            self.on_loop.append(False)
        return super().encode(text, add_special_tokens)


def test_prompts_are_tokenized_off_the_event_loop(model: LoadedModel) -> None:
    tokenizer = _LoopCheckingTokenizer()
    m = dataclasses.replace(model, tokenizer=tokenizer)  # type: ignore[arg-type]
    engine = _engine(m)
    with _app(m, engine, max_prompt_tokens=200) as client:
        # Greedy: a sampled first token may be the poisoned one (1 in 256), and the next step NaN.
        r = client.post("/v1/completions", json={"prompt": "tokenize me", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        r = client.post("/v1/completions", json={"prompt": "y" * 300_000, "max_tokens": 2})
        assert r.status_code in (400, 413), r.text
    assert tokenizer.on_loop and not any(tokenizer.on_loop), tokenizer.on_loop


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        b'{"prompt": "a\\ud800", "max_tokens": 2}',
        b'{"prompt": "\\udfff\\ud800", "max_tokens": 2}',
    ],
    ids=["deep list", "deep prompt", "lone high surrogate", "reversed surrogates"],
)
def test_malformed_json_is_a_4xx(model: LoadedModel, body: bytes) -> None:
    engine = _engine(model)
    with _app(model, engine, max_body_bytes=2**20) as client:
        r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text[:300]
        assert r.json()["error"]["message"]
        _healthy(client, model, engine)


def test_lone_surrogate_in_a_chat_message_is_a_4xx(model: LoadedModel) -> None:
    engine = _engine(model)
    body = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    with _app(model, engine) as client:
        r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert 400 <= r.status_code < 500, r.text[:300]
        _healthy(client, model, engine)


def test_non_streaming_request_is_aborted_when_its_client_leaves(model: LoadedModel) -> None:
    engine = _engine(model)
    step = engine.step
    aborted: list[int] = []
    abort = engine.abort
    engine.abort = lambda seq_id: (aborted.append(seq_id), abort(seq_id))[-1]  # type: ignore[method-assign]

    def slow_step() -> list:
        time.sleep(0.01)  # 800 tokens take 8 s or more
        return step()

    engine.step = slow_step  # type: ignore[method-assign]
    with _live_server(model, engine) as url:
        req = {"prompt": "go on", "max_tokens": 800, "temperature": 0, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url + "/v1/completions", json=req, timeout=0.5)
        started = time.monotonic()
        assert _wait_until(lambda: engine.pool.num_used_blocks == 0 and not engine.sequences, 5.0)
        assert time.monotonic() - started < 4.0
        assert len(aborted) == 1
        ok = {"prompt": "ok", "max_tokens": 2, "temperature": 0}  # greedy: never the poisoned token
        r = httpx.post(url + "/v1/completions", json=ok, timeout=30)
        assert r.status_code == 200


def test_ready_says_whether_the_engine_takes_work(model: LoadedModel) -> None:
    engine = _engine(model)
    with _app(model, engine) as client:
        assert client.get("/ready").status_code == 200
        assert client.get("/health").json()["status"] == "ok"
