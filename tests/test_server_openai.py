"""OpenAI API fidelity: nothing is ignored silently, prompts in every form, vLLM's tokenizer routes.

References: the engine's tokenizer (ids = UTF-8 bytes) for /tokenize and
/detokenize, single-prompt responses for batched prompts, the engine run
directly for `ignore_eos`, the schemas' own tables for unsupported fields.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_server import ByteTokenizer, _client, _engine, _events, _reference

import kvengine
from kvengine.config import ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel
from kvengine.server import create_app
from kvengine.server.schemas import ChatRequest, CompletionRequest

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
ROUTES = [("/v1/completions", COMPLETION, CompletionRequest), ("/v1/chat/completions", CHAT, ChatRequest)]
# A value each not-yet-supported field may take that is not its "off" value.
ON_VALUES: dict[str, Any] = {
    "n": 2,
    "min_tokens": 1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "repetition_penalty": 1.1,
    "logit_bias": {"5": 10.0},
    "logprobs": 1,
    "echo": True,
    "best_of": 2,
    "suffix": "end",
    "top_logprobs": 2,
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f"}}],
    "tool_choice": "auto",
}


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(_tiny(), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def _tiny() -> LoadedModel:
    from conftest import tiny_model

    return tiny_model("llama")


def _error(r: Any, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.mark.parametrize(("route", "ok", "cls"), ROUTES, ids=["completions", "chat"])
def test_unknown_fields_are_a_400_naming_them(model: LoadedModel, route: str, ok: dict, cls: type) -> None:
    with _client(model) as client:
        err = _error(client.post(route, json={**ok, "frobnicate": 1}))
        assert err["param"] == "frobnicate" and "unknown field" in err["message"]
        err = _error(client.post(route, json={**ok, "stream": True, "stream_options": {"usage": True}}))
        assert err["param"] == "stream_options.usage"
        if cls is ChatRequest:
            bad = {**ok, "messages": [{"role": "user", "content": "hi", "tool_calls": []}]}
            assert _error(client.post(route, json=bad))["param"] == "messages.0.tool_calls"
        assert client.post(route, json={**ok, "user": "someone"}).status_code == 200  # a documented no-op


@pytest.mark.parametrize(("route", "ok", "cls"), ROUTES, ids=["completions", "chat"])
def test_fields_not_supported_yet_are_a_400_unless_off(
    model: LoadedModel, route: str, ok: dict, cls: Any
) -> None:
    table = cls.NOT_SUPPORTED_YET
    on = {**ON_VALUES, "logprobs": True} if cls is ChatRequest else ON_VALUES  # a bool in chat
    assert set(table) <= set(on), "give a new field a value to test with"
    assert table, "every field is supported: drop this test"
    with _client(model) as client:
        for name, off in table.items():
            err = _error(client.post(route, json={**ok, name: on[name]}))
            assert err["param"] == name and "not supported yet" in err["message"], name
            for value in off:  # what clients send by default is served
                r = client.post(route, json={**ok, name: value})
                assert r.status_code == 200, (name, value, r.text)


class _EosTokenizer(ByteTokenizer):
    eos_token_id: int | None = None


def test_ignore_eos_runs_to_max_tokens(model: LoadedModel) -> None:
    prompt = "stop early"
    full = _engine(model).generate([list(prompt.encode())], SamplingParams(max_tokens=8))[0].output_ids
    eos = full[2]
    assert eos not in full[:2]
    tokenizer = _EosTokenizer()
    tokenizer.eos_token_id = eos
    eos_model = dataclasses.replace(model, tokenizer=tokenizer)  # type: ignore[arg-type]
    req = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
    with _client(eos_model) as client:
        stopped = client.post("/v1/completions", json=req).json()
        ignored = client.post("/v1/completions", json={**req, "ignore_eos": True}).json()
    assert stopped["usage"]["completion_tokens"] == 3 and stopped["choices"][0]["finish_reason"] == "stop"
    assert ignored["usage"]["completion_tokens"] == 8 and ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["choices"][0]["text"] == bytes(full).decode("utf-8", errors="replace")


def test_every_prompt_form_gives_one_choice_per_prompt(model: LoadedModel) -> None:
    prompts = ["first prompt", "a second one", "x"]
    req = {"max_tokens": 5, "temperature": 0}
    with _client(model) as client:
        single = [client.post("/v1/completions", json={**req, "prompt": p}).json() for p in prompts]
        texts = [s["choices"][0]["text"] for s in single]
        assert texts == [_reference(model, p, 5) for p in prompts]
        as_ids = client.post("/v1/completions", json={**req, "prompt": list(prompts[0].encode())}).json()
        assert as_ids["choices"][0]["text"] == texts[0]
        for batch in (prompts, [list(p.encode()) for p in prompts]):
            body = client.post("/v1/completions", json={**req, "prompt": batch}).json()
            assert [c["index"] for c in body["choices"]] == [0, 1, 2]
            assert [c["text"] for c in body["choices"]] == texts
            for key in ("prompt_tokens", "completion_tokens"):
                assert body["usage"][key] == sum(s["usage"][key] for s in single)
            stream = {**req, "prompt": batch, "stream": True, "stream_options": {"include_usage": True}}
            events = _events(client.post("/v1/completions", json=stream).text)
            streamed = [
                "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"][0]["index"] == i)
                for i in range(3)
            ]
            assert streamed == texts
            assert events[-1]["usage"] == body["usage"]
        assert client.app.state.server.num_in_flight == 0  # type: ignore[attr-defined]
        assert client.engine.pool.num_used_blocks == 0  # type: ignore[attr-defined]


def test_bad_prompts_are_a_400_naming_them(model: LoadedModel) -> None:
    with _client(model) as client:
        err = _error(client.post("/v1/completions", json={"prompt": [[1, 2], [3, 999, 1000]]}))
        assert err["param"] == "prompt.1" and "999, 1000" in err["message"] and "256" in err["message"]
        err = _error(client.post("/v1/completions", json={"prompt": ["ok", ""]}))
        assert err["param"] == "prompt.1" and "empty" in err["message"]
        err = _error(client.post("/v1/completions", json={"prompt": {"a": 1}}))
        assert err["param"] == "prompt" and "list[list[int]]" in err["message"]
        err = _error(client.post("/v1/completions", json={"prompt": [1, "a"]}))
        assert err["param"] == "prompt"


def test_tool_messages_are_rendered(model: LoadedModel) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "calling"},
        {"role": "tool", "content": "sunny", "tool_call_id": "call-1"},
    ]
    transcript = "user: weather?\nassistant: calling\ntool: sunny\nassistant:"
    with _client(model) as client:
        r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(transcript.encode())


def test_tokenize_detokenize_and_version(model: LoadedModel) -> None:
    text = "caf\u00e9 \u4f60\u597d"
    auth = {"authorization": "Bearer k"}
    with _client(model, api_keys=("k",)) as client:
        assert client.post("/tokenize", json={"prompt": text}).status_code == 401
        r = client.post("/tokenize", json={"prompt": text}, headers=auth).json()
        assert r["tokens"] == list(text.encode()) and r["count"] == len(text.encode())
        assert r["max_model_len"] == model.max_context_len and r["token_strs"] is None
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/tokenize", json=chat, headers=auth).json()
        assert r["tokens"] == list(b"user: hi\nassistant:")
        r = client.post("/tokenize", json={**chat, "add_generation_prompt": False}, headers=auth).json()
        assert r["tokens"] == list(b"user: hi\n")
        assert _error(client.post("/tokenize", json={}, headers=auth))["param"] == "prompt"
        r = client.post("/detokenize", json={"tokens": list(text.encode())}, headers=auth)
        assert r.json() == {"prompt": text}
        err = _error(client.post("/detokenize", json={"tokens": [65, 300]}, headers=auth))
        assert err["param"] == "tokens" and "300" in err["message"]
        assert _error(client.post("/detokenize", json={"tokens": [65], "model": "x"}, headers=auth), 404)
        assert client.get("/version").json() == {"version": kvengine.__version__}


@pytest.mark.model
def test_tokenize_matches_the_bundled_tokenizer(bundled: LoadedModel) -> None:
    text = "The caf\u00e9 \u4f60\u597d \U0001f389"
    tok = bundled.tokenizer
    assert tok is not None
    with TestClient(create_app(AsyncEngine(_engine(bundled)), bundled, ServerConfig())) as client:
        r = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
        assert r["tokens"] == tok.encode(text) and r["token_strs"] == tok.convert_ids_to_tokens(r["tokens"])
        r = client.post("/detokenize", json={"tokens": r["tokens"]}).json()
        assert r["prompt"] == tok.decode(tok.encode(text), skip_special_tokens=True)


def test_served_model_name(model: LoadedModel) -> None:
    app = create_app(AsyncEngine(_engine(model)), model, ServerConfig(), served_model_name="alias")
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["alias"]
        r = client.post("/v1/completions", json={**COMPLETION, "model": "alias"})
        assert r.status_code == 200 and r.json()["model"] == "alias"
        assert _error(client.post("/v1/completions", json={**COMPLETION, "model": model.name}), 404)
        assert 'model_name="alias"' in client.get("/metrics").text
