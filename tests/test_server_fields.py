"""Every field of the completions and chat request bodies is honoured (a named test checks it against
a reference) or refused with a 400 naming it (`NOT_SUPPORTED_YET`); and the sampling fields reach the
engine as they were sent."""

from __future__ import annotations

import dataclasses
import importlib

import pytest
from conftest import tiny_model

from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel
from kvengine.server.schemas import ChatRequest, CompletionRequest

# Field -> the test (module::function) that checks the server honours it against a reference.
HONOURED = {
    "model": "test_server_openai::test_served_model_name",
    "prompt": "test_server_openai::test_every_prompt_form_gives_one_choice_per_prompt",
    "messages": "test_server_openai::test_tool_messages_are_rendered",
    "max_tokens": "test_server::test_completion_matches_engine",
    "max_completion_tokens": "test_server_fields::test_sampling_fields_reach_the_engine",
    "temperature": "test_server_fields::test_sampling_fields_reach_the_engine",
    "top_p": "test_server_fields::test_sampling_fields_reach_the_engine",
    "top_k": "test_server_fields::test_sampling_fields_reach_the_engine",
    "seed": "test_server_fields::test_sampling_fields_reach_the_engine",
    "stop": "test_server::test_chat_stream_and_stop_string",
    "ignore_eos": "test_server_openai::test_ignore_eos_runs_to_max_tokens",
    "stream": "test_server::test_streaming_equals_non_streaming",
    "stream_options": "test_server_fields::test_stream_options_put_usage_on_chunks",
    "kv_press": "test_server::test_models_health_and_press",
    "kv_compression_ratio": "test_server::test_models_health_and_press",
    "user": "test_server_openai::test_unknown_fields_are_a_400_naming_them",
    "n": "test_parallel_sampling::test_the_server_samples_n_choices_from_one_prompt",
    "best_of": "test_parallel_sampling::test_best_of_returns_the_most_likely_choice",
    "min_tokens": "test_structured_output::test_min_tokens_defers_stop_strings",
    "presence_penalty": "test_penalties::test_the_server_honours_penalties_and_names_bad_ones",
    "frequency_penalty": "test_penalties::test_the_server_honours_penalties_and_names_bad_ones",
    "repetition_penalty": "test_penalties::test_the_server_honours_penalties_and_names_bad_ones",
    "logit_bias": "test_penalties::test_the_server_honours_logit_bias_and_names_bad_ones",
    "logprobs": "test_logprobs::test_completion_logprobs_of_generated_tokens",
    "top_logprobs": "test_logprobs::test_chat_logprobs_shape",
    "echo": "test_logprobs::test_echo_logprobs_on_token_prompts_match_transformers",
    "response_format": "test_structured_output::test_the_server_enforces_response_format",
    "semantic_cache": "test_semantic_server::test_repeat_is_served_from_the_cache_with_the_computed_answer",
    "kv_chunks": "test_rag_server::test_kv_chunks_give_the_tokens_of_the_python_api",
    "kv_blend": "test_rag_server::test_kv_chunks_give_the_tokens_of_the_python_api",
}


@pytest.mark.parametrize("cls", [CompletionRequest, ChatRequest], ids=["completions", "chat"])
def test_every_request_field_is_honoured_or_refused(cls: type) -> None:
    refused = set(cls.NOT_SUPPORTED_YET)  # type: ignore[attr-defined]
    for name in cls.model_fields:  # type: ignore[attr-defined]
        if name in refused:
            assert name not in HONOURED, f"{name} is both refused and honoured"
            continue
        assert name in HONOURED, f"{cls.__name__}.{name}: name the test that checks it, or refuse it"
        module, function = HONOURED[name].split("::")
        assert callable(getattr(importlib.import_module(module), function, None)), HONOURED[name]


@pytest.fixture(scope="module")
def served() -> LoadedModel:
    from test_server import ByteTokenizer

    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def test_sampling_fields_reach_the_engine(served: LoadedModel) -> None:
    from test_server import _client, _engine

    fields = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 5}
    params = SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, top_k=20, seed=5, ignore_eos=True)
    prompt = "sample me"
    expected = _engine(served).generate([list(prompt.encode())], params)[0].output_ids
    with _client(served) as client:
        body = {"prompt": prompt, "max_tokens": 9, "ignore_eos": True, **fields}
        text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        assert text == bytes(expected).decode("utf-8", errors="replace")
        other = client.post("/v1/completions", json={**body, "seed": 6}).json()["choices"][0]["text"]
        assert other != text
        chat = {
            "messages": [{"role": "user", "content": "x"}],
            "max_completion_tokens": 3,
            "ignore_eos": True,
        }
        r = client.post("/v1/chat/completions", json={**chat, **fields})
        assert r.json()["usage"]["completion_tokens"] == 3


def test_stream_options_put_usage_on_chunks(served: LoadedModel) -> None:
    from test_server import _client, _events

    body = {"prompt": "count", "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    with _client(served) as client:
        events = _events(client.post("/v1/completions", json={**body, "n": 2}).text)
        assert all("usage" not in e for e in events)
        options = {"include_usage": True, "continuous_usage_stats": True}
        events = _events(client.post("/v1/completions", json={**body, "stream_options": options}).text)
        done = [e["usage"]["completion_tokens"] for e in events if e["choices"]]
        assert done == sorted(done) and done[-1] == 5  # the usage so far, on every chunk
        assert not events[-1]["choices"] and events[-1]["usage"]["completion_tokens"] == 5
        assert events[-1]["usage"]["prompt_tokens"] == len(b"count")


# OpenAI's own request fields (its API reference, 2026): each is honoured (above) or a 400 naming it.
OPENAI_COMPLETIONS = [
    "model", "prompt", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n",
    "presence_penalty", "seed", "stop", "stream", "stream_options", "suffix", "temperature", "top_p", "user",
]  # fmt: skip
OPENAI_CHAT = [
    "messages", "model", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
    "max_completion_tokens", "max_tokens", "metadata", "modalities", "n", "parallel_tool_calls", "prediction",
    "presence_penalty", "prompt_cache_key", "reasoning_effort", "response_format", "safety_identifier", "seed",
    "service_tier", "stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools",
    "top_logprobs", "top_p", "user", "verbosity", "web_search_options",
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "cls", "names"),
    [
        ("/v1/completions", CompletionRequest, OPENAI_COMPLETIONS),
        ("/v1/chat/completions", ChatRequest, OPENAI_CHAT),
    ],
    ids=["completions", "chat"],
)
def test_openai_fields_are_honoured_or_named_in_a_400(
    served: LoadedModel, route: str, cls: type, names: list[str]
) -> None:
    from test_server import _client

    ok = {"prompt": "hi"} if cls is CompletionRequest else {"messages": [{"role": "user", "content": "hi"}]}
    refused = set(cls.NOT_SUPPORTED_YET)  # type: ignore[attr-defined]
    with _client(served) as client:
        for name in names:
            if name in HONOURED and name not in refused:
                continue
            r = client.post(route, json={**ok, "max_tokens": 2, name: {"x": 1}})
            assert r.status_code == 400, (name, r.text)
            assert r.json()["error"]["param"].split(".")[0] == name, (name, r.text)
