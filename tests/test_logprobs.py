"""Log-probabilities against transformers: generated tokens, prompt tokens, top-k, echo over HTTP.

The reference is `torch.log_softmax` of transformers' own full-sequence
forward logits (fp32, SDPA attention), position by position.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import hf_logits, tiny_model
from test_server import ByteTokenizer, _client, _events

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.logprobs import Logprob
from kvengine.engine.request import RequestOutput, SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel

TOL = 1e-4


def _prompt(length: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (length,), generator=g).tolist()


def _engine(model: LoadedModel, prefix_cache: bool = False, max_step_tokens: int = 256) -> Engine:
    return Engine(
        model,
        CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=prefix_cache),
        SchedulerConfig(max_step_tokens=max_step_tokens),
    )


def _reference(model: LoadedModel, tokens: list[int]) -> torch.Tensor:
    """Log-probabilities `(T, V)` of transformers' full forward over `tokens`."""
    return torch.log_softmax(hf_logits(model, tokens), dim=-1)


def _check(entry: Logprob | None, ref_row: torch.Tensor, k: int) -> None:
    assert entry is not None
    assert abs(entry.logprob - float(ref_row[entry.token_id])) < TOL
    values, indices = torch.topk(ref_row, k)
    assert [t for t, _ in entry.top] == indices.tolist()
    torch.testing.assert_close(torch.tensor([lp for _, lp in entry.top]), values, atol=TOL, rtol=0)


def _check_prompt(out: RequestOutput, ref: torch.Tensor, k: int) -> None:
    assert out.prompt_logprobs is not None and len(out.prompt_logprobs) == len(out.prompt_ids)
    assert out.prompt_logprobs[0] is None
    for i, entry in enumerate(out.prompt_logprobs[1:], start=1):
        assert entry is not None and entry.token_id == out.prompt_ids[i]
        _check(entry, ref[i - 1], k)


@pytest.mark.parametrize("max_step_tokens", [256, 7], ids=["one-chunk", "chunked"])
def test_logprobs_match_transformers(max_step_tokens: int, no_leaks: list) -> None:
    model = tiny_model("llama")
    engine = _engine(model, max_step_tokens=max_step_tokens)
    no_leaks.append(engine)
    prompts = [_prompt(23, 1), _prompt(9, 2)]
    params = SamplingParams(max_tokens=5, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    outs = engine.generate(prompts, params)
    for out in outs:
        ref = _reference(model, out.prompt_ids + out.output_ids)
        _check_prompt(out, ref, 2)
        assert out.logprobs is not None and len(out.logprobs) == len(out.output_ids) == 5
        for j, entry in enumerate(out.logprobs):
            assert entry.token_id == out.output_ids[j]
            _check(entry, ref[len(out.prompt_ids) + j - 1], 3)


def test_logprobs_are_taken_before_sampling_controls(no_leaks: list) -> None:
    model = tiny_model("llama")
    engine = _engine(model)
    no_leaks.append(engine)
    params = SamplingParams(max_tokens=3, temperature=0.7, top_k=5, seed=1, ignore_eos=True, logprobs=0)
    out = engine.generate([_prompt(12, 3)], params)[0]
    ref = _reference(model, out.prompt_ids + out.output_ids)
    assert out.logprobs is not None
    for j, entry in enumerate(out.logprobs):
        assert abs(entry.logprob - float(ref[12 + j - 1, entry.token_id])) < TOL and entry.top == ()


def test_prompt_logprobs_with_the_prefix_cache(no_leaks: list) -> None:
    """The second identical request bypasses the cached prefix: its scores are computed, not missing."""
    model = tiny_model("llama")
    engine = _engine(model, prefix_cache=True, max_step_tokens=8)
    no_leaks.append(engine)
    prompt = _prompt(30, 4)
    engine.generate([prompt], SamplingParams(max_tokens=2))  # leaves the prompt cached
    ref = _reference(model, prompt)
    for _ in range(2):
        out = engine.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        assert out.num_cached_tokens == 0
        _check_prompt(out, ref, 1)
    assert engine.generate([prompt], SamplingParams(max_tokens=1))[0].num_cached_tokens > 0
    assert engine.prefix is not None
    engine.prefix.evict(engine.pool.num_blocks)


def test_max_tokens_zero_scores_the_prompt_only(no_leaks: list) -> None:
    model = tiny_model("llama")
    engine = _engine(model, max_step_tokens=5)
    no_leaks.append(engine)
    prompt = _prompt(17, 5)
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=0, prompt_logprobs=0))
    events = []
    while engine.has_unfinished():
        events += engine.step()
    assert len(events) == 1
    (event,) = events
    assert (event.seq_id, event.token_id, event.finished, event.finish_reason) == (
        seq_id,
        None,
        True,
        "length",
    )
    out = RequestOutput.of(engine.release(seq_id))
    assert out.output_ids == [] and event.prompt_logprobs == out.prompt_logprobs
    _check_prompt(out, _reference(model, prompt), 0)
    assert engine.pool.num_used_blocks == 0


def test_bad_values_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(InvalidRequestError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    with pytest.raises(InvalidRequestError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    assert SamplingParams(max_tokens=0, prompt_logprobs=0).max_tokens == 0


# ---- the server ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def test_echo_logprobs_on_token_prompts_match_transformers(model: LoadedModel) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, max_tokens 0, token ids."""
    prompts = [list(b"the cat sat"), list(b"a dog")]
    body = {"prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 0, "temperature": 0}
    with _client(model) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert client.engine.pool.num_used_blocks == 0  # type: ignore[attr-defined]
    for choice, prompt in zip(r.json()["choices"], prompts, strict=True):
        assert choice["text"] == bytes(prompt).decode() and choice["finish_reason"] == "length"
        lp = choice["logprobs"]
        ref = _reference(model, prompt)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        expected = [float(ref[i - 1, prompt[i]]) for i in range(1, len(prompt))]
        torch.testing.assert_close(
            torch.tensor(lp["token_logprobs"][1:]), torch.tensor(expected), atol=TOL, rtol=0
        )
        assert lp["tokens"] == [chr(t) for t in prompt]
        assert lp["text_offset"] == list(range(len(prompt)))
        assert all(len(top) in (2, 3) for top in lp["top_logprobs"][1:])  # k best, and the token itself


def test_completion_logprobs_of_generated_tokens(model: LoadedModel) -> None:
    body = {"prompt": "hi", "logprobs": 1, "max_tokens": 4, "temperature": 0, "echo": True}
    with _client(model) as client:
        choice = client.post("/v1/completions", json=body).json()["choices"][0]
        stream = client.post("/v1/completions", json={**body, "echo": False, "stream": True})
    out = _engine(model).generate([list(b"hi")], SamplingParams(max_tokens=4))[0]
    ids = out.prompt_ids + out.output_ids
    ref = _reference(model, ids)
    lp = choice["logprobs"]
    assert choice["text"] == "hi" + bytes(out.output_ids).decode(errors="replace")
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    torch.testing.assert_close(
        torch.tensor(lp["token_logprobs"][1:]), torch.tensor(expected), atol=TOL, rtol=0
    )
    assert lp["text_offset"][:3] == [0, 1, 2]
    chunks = [e["choices"][0]["logprobs"] for e in _events(stream.text) if e["choices"]]
    streamed = [x for c in chunks if c is not None for x in c["token_logprobs"]]
    torch.testing.assert_close(
        torch.tensor(streamed), torch.tensor(lp["token_logprobs"][2:]), atol=TOL, rtol=0
    )


def test_chat_logprobs_shape(model: LoadedModel) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    with _client(model) as client:
        r = client.post("/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 2})
        assert r.status_code == 200, r.text
        none = client.post("/v1/chat/completions", json={**body, "logprobs": False}).json()
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and none["choices"][0]["logprobs"] is None
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode()) and len(entry["top_logprobs"]) == 2
        assert entry["logprob"] == max(t["logprob"] for t in entry["top_logprobs"])  # greedy


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 6}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "echo": True, "stream": True}, "echo"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 21},
            "top_logprobs",
        ),
    ],
)
def test_bad_logprob_fields_are_a_400_naming_them(
    model: LoadedModel, route: str, body: dict, param: str
) -> None:
    with _client(model) as client:
        r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
