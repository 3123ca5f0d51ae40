"""What a request's next token may be: `min_tokens` (against a logit-bias reference) and grammars
(JSON schemas through llguidance: every output parses and matches its schema, even from a random model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny_model
from test_engine import random_prompt

from kvengine.config import CacheConfig
from kvengine.engine.constraints import Grammar
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


def _generate(model: LoadedModel, prompt: list[int], params: SamplingParams) -> list[int]:
    engine = Engine(model, CacheConfig(max_kv_bytes=8 * 2**20))
    [out] = engine.generate([prompt], params)
    assert engine.pool.num_used_blocks == 0
    return out.output_ids


def test_min_tokens_holds_eos_back() -> None:
    prompt = random_prompt(20, 1)
    first = _generate(tiny_model("llama"), prompt, SamplingParams(max_tokens=1))[0]
    model = tiny_model("llama", eos_token_id=first)  # greedy would stop at once
    assert _generate(model, prompt, SamplingParams(max_tokens=10)) == [first]
    held = _generate(model, prompt, SamplingParams(max_tokens=10, min_tokens=6))
    # The reference: the same greedy run with EOS banned by a logit bias for the first 6 tokens.
    banned = _generate(model, prompt, SamplingParams(max_tokens=6, logit_bias=((first, -100.0),)))
    assert held[:6] == banned and first not in held[:6]
    assert len(held) == 10 or held[-1] == first  # afterwards EOS may end it again


def test_min_tokens_defers_stop_strings() -> None:
    from test_server import ByteTokenizer, _client

    served = dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    body = {"prompt": "stop late", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with _client(served) as client:
        full = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop = full[1:3]  # appears at character 1: it would stop the output right away
        early = client.post("/v1/completions", json={**body, "stop": stop}).json()["choices"][0]
        late = client.post("/v1/completions", json={**body, "stop": stop, "min_tokens": 6}).json()["choices"][
            0
        ]
        assert early["text"] == full[: full.find(stop)]
        assert late["text"] == full[: full.find(stop, 6)] if full.find(stop, 6) >= 0 else full
        r = client.post("/v1/completions", json={**body, "min_tokens": 13})
        assert r.status_code == 400 and "min_tokens" in r.text


def test_bad_values_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(InvalidRequestError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=-1)
    with pytest.raises(InvalidRequestError, match="grammar"):
        SamplingParams(max_tokens=4, min_tokens=1, grammar=Grammar.json_object())
    with pytest.raises(InvalidRequestError, match="not valid JSON"):
        Grammar("{not json")
    with pytest.raises(InvalidRequestError, match="JSON object"):
        Grammar("[1, 2]")


# ---- grammars: a real tokenizer (the bundled model's) over a random model -----------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def _matches(value: object) -> bool:
    """SCHEMA checked by hand (no validator library in the dependencies)."""
    return (
        isinstance(value, dict)
        and set(value) == {"name", "age", "pets"}
        and isinstance(value["name"], str)
        and len(value["name"]) <= 12
        and isinstance(value["age"], int)
        and 0 <= value["age"] <= 150
        and isinstance(value["pets"], list)
        and len(value["pets"]) <= 3
        and all(p in ("cat", "dog") for p in value["pets"])
    )


@pytest.fixture(scope="module")
def random_with_tokenizer(bundled: LoadedModel) -> LoadedModel:
    assert bundled.tokenizer is not None
    model = tiny_model("llama", vocab_size=int(bundled.config.vocab_size))
    return dataclasses.replace(model, tokenizer=bundled.tokenizer)


@pytest.mark.model
def test_every_output_matches_its_schema(random_with_tokenizer: LoadedModel) -> None:
    model = random_with_tokenizer
    assert model.tokenizer is not None
    engine = Engine(model, CacheConfig(max_kv_bytes=32 * 2**20))
    prompt = model.tokenizer.encode("A person as JSON:")
    params = [
        SamplingParams(max_tokens=80, temperature=1.0, seed=seed, grammar=Grammar.from_schema(SCHEMA))
        for seed in range(4)
    ]
    outs = engine.generate([prompt] * len(params), params)
    free = engine.generate([prompt], SamplingParams(max_tokens=20))[0]
    for out in outs:
        text = model.tokenizer.decode(out.output_ids, skip_special_tokens=True)
        assert out.finish_reason == "stop", text
        assert _matches(json.loads(text)), text
    with pytest.raises(json.JSONDecodeError):  # the same model unconstrained: not JSON
        json.loads(model.tokenizer.decode(free.output_ids, skip_special_tokens=True))


@pytest.mark.model
def test_the_server_enforces_response_format(bundled: LoadedModel) -> None:
    from fastapi.testclient import TestClient

    from kvengine.config import ServerConfig
    from kvengine.engine.async_engine import AsyncEngine
    from kvengine.server.app import create_app

    chat = {
        "messages": [{"role": "user", "content": "Describe a person."}],
        "max_tokens": 60,
        "temperature": 0,
    }
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    engine = Engine(bundled, CacheConfig(max_kv_bytes=64 * 2**20))
    with TestClient(create_app(AsyncEngine(engine), bundled, ServerConfig())) as client:
        r = client.post("/v1/chat/completions", json={**chat, "response_format": schema})
        assert r.status_code == 200, r.text
        assert _matches(json.loads(r.json()["choices"][0]["message"]["content"]))
        r = client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "json_object"}})
        assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"]), dict)
        plain = client.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}})
        assert plain.json()["choices"] == client.post("/v1/chat/completions", json=chat).json()["choices"]
        for bad in (
            {"type": "json_schema"},
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
            {"type": "xml"},
        ):
            r = client.post("/v1/chat/completions", json={**chat, "response_format": bad})
            assert r.status_code == 400 and "response_format" in r.text, (bad, r.text)
        assert engine.pool.num_used_blocks == 0
