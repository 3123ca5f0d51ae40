"""The semantic cache in the server: opt-in field, response flag, metrics, tenants, sampled bypass, bad input.

A tiny random Llama with a byte-level tokenizer; its answers are checked
against the same server's uncached answers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from test_server import ByteTokenizer

from kvengine.config import CacheConfig, ServerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.models import LoadedModel
from kvengine.server import create_app


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


@contextmanager
def _client(model: LoadedModel, **server: Any) -> Iterator[TestClient]:
    engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22))
    app = create_app(AsyncEngine(engine), model, ServerConfig(**server))
    with TestClient(app) as client:
        yield client


def _ask(client: TestClient, text: str, key: str | None = None, **extra: Any) -> Any:
    body = {"prompt": text, "max_tokens": 6, "temperature": 0.0, "semantic_cache": {"max_error": 0.05}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return client.post("/v1/completions", json={**body, **extra}, headers=headers)


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"kvengine_semantic_cache_{name}"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def test_repeat_is_served_from_the_cache_with_the_computed_answer(model: LoadedModel) -> None:
    with _client(model) as client:
        plain = client.post(
            "/v1/completions", json={"prompt": "hello world", "max_tokens": 6, "temperature": 0.0}
        )
        first = _ask(client, "hello world").json()
        assert first["semantic_cache"] == {
            "hit": False,
            "decision": "miss",
            "similarity": None,
            "threshold": None,
        }
        assert first["choices"][0]["text"] == plain.json()["choices"][0]["text"]
        second = _ask(client, "hello world").json()
        assert second["semantic_cache"]["hit"] and second["semantic_cache"]["decision"] == "hit"
        assert second["choices"][0]["text"] == first["choices"][0]["text"]
        assert second["usage"]["prompt_tokens"] == len("hello world")
        assert _metric(client, "lookups_total") == 2 and _metric(client, "hits_total") == 1
        assert _metric(client, "entries") == 1
        # Other sampling parameters are another cache space: no hit.
        other = _ask(client, "hello world", max_tokens=5).json()
        assert other["semantic_cache"]["decision"] == "miss"
        # Without the field nothing is looked up and no flag is added.
        assert "semantic_cache" not in client.post("/v1/completions", json={"prompt": "hello world"}).json()
        assert _metric(client, "lookups_total") == 3


def test_tenants_never_share_answers(model: LoadedModel) -> None:
    with _client(model, api_keys=("key-a", "key-b")) as client:
        assert _ask(client, "same words", key="key-a").json()["semantic_cache"]["decision"] == "miss"
        assert _ask(client, "same words", key="key-a").json()["semantic_cache"]["hit"]
        b = _ask(client, "same words", key="key-b").json()["semantic_cache"]
        assert b == {"hit": False, "decision": "miss", "similarity": None, "threshold": None}


def test_sampled_requests_bypass_unless_allowed(model: LoadedModel) -> None:
    with _client(model) as client:
        for _ in range(2):
            out = _ask(client, "pick a word", temperature=0.8, seed=1).json()
            assert out["semantic_cache"] == {"hit": False, "decision": "bypassed"}
        assert _metric(client, "lookups_total") == 0 and _metric(client, "bypassed_sampled_total") == 2
        options = {"max_error": 0.05, "allow_sampled": True}
        _ask(client, "pick a word", temperature=0.8, seed=1, semantic_cache=options)
        again = _ask(client, "pick a word", temperature=0.8, seed=1, semantic_cache=options).json()
        assert again["semantic_cache"]["hit"]


def test_chat_uses_the_last_message_and_keys_the_rest(model: LoadedModel) -> None:
    def chat(system: str) -> Any:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": "hi there"}]
        body = {
            "messages": messages,
            "max_tokens": 4,
            "temperature": 0.0,
            "semantic_cache": {"max_error": 0.1},
        }
        return client.post("/v1/chat/completions", json=body)

    model = dataclasses.replace(model, tokenizer=_ChatBytes())  # type: ignore[arg-type]
    with _client(model) as client:
        assert chat("be brief").json()["semantic_cache"]["decision"] == "miss"
        hit = chat("be brief").json()
        assert hit["semantic_cache"]["hit"] and hit["object"] == "chat.completion"
        assert chat("be verbose").json()["semantic_cache"]["decision"] == "miss"  # another conversation


class _ChatBytes(ByteTokenizer):
    chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text) if kwargs.get("tokenize", True) else text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"semantic_cache": {"max_error": 0.0}}, "max_error"),
        ({"semantic_cache": {"max_error": 1.0}}, "max_error"),
        ({"semantic_cache": {"max_error": "0.1"}}, "max_error"),
        ({"semantic_cache": {}}, "max_error"),
        ({"semantic_cache": {"max_error": 0.1, "ttl": 5}}, "ttl"),
        ({"stream": True}, "stream"),
        ({"n": 2}, "one choice"),
        ({"logprobs": 1}, "logprobs"),
        ({"prompt": ["a", "b"]}, "one prompt"),
    ],
)
def test_bad_input_is_a_400_and_nothing_is_cached(model: LoadedModel, extra: dict, message: str) -> None:
    with _client(model) as client:
        r = _ask(client, "hello world", **extra)
        assert r.status_code == 400, r.text
        assert message in r.json()["error"]["message"] or message in str(r.json()["error"]["param"])
        assert _metric(client, "lookups_total") == 0 and _metric(client, "entries") == 0
