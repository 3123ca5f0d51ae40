"""Sampling penalties against references: transformers' repetition penalty, OpenAI's formula for
presence and frequency penalties, and the server honouring them."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, use_sdpa
from test_engine import random_prompt
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.sampler import penalize
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("llama")


def _engine_greedy(model: LoadedModel, prompt: list[int], n: int, **penalties: float) -> list[int]:
    engine = Engine(model, CacheConfig(max_kv_bytes=8 * 2**20))
    [out] = engine.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True, **penalties))
    assert engine.pool.num_used_blocks == 0
    return out.output_ids


def _reference_greedy(
    model: LoadedModel, prompt: list[int], n: int, presence: float, frequency: float
) -> list[int]:
    """Greedy decoding by full forwards, with OpenAI's formula written out."""
    ids = list(prompt)
    out: list[int] = []
    with use_sdpa(model) as hf, torch.inference_mode():
        for _ in range(n):
            logits = hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
            for token in set(out):
                logits[token] -= frequency * out.count(token) + presence
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


def test_repetition_penalty_equals_transformers(model: LoadedModel) -> None:
    for seed, penalty in ((1, 1.5), (2, 0.7), (3, 3.0)):
        prompt = random_prompt(30, seed)
        with use_sdpa(model) as hf, torch.inference_mode():
            out = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=12,
                do_sample=False,
                logits_processor=LogitsProcessorList([RepetitionPenaltyLogitsProcessor(penalty)]),
                pad_token_id=0,
            )
        expected = out[0, len(prompt) :].tolist()
        assert _engine_greedy(model, prompt, 12, repetition_penalty=penalty) == expected
    # The penalty changes the tokens (else this test could not fail).
    assert _engine_greedy(model, random_prompt(30, 3), 12, repetition_penalty=3.0) != _engine_greedy(
        model, random_prompt(30, 3), 12
    )


@pytest.mark.parametrize(("presence", "frequency"), [(1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)])
def test_presence_and_frequency_penalties_follow_openai(
    model: LoadedModel, presence: float, frequency: float
) -> None:
    prompt = random_prompt(20, 7)
    got = _engine_greedy(model, prompt, 16, presence_penalty=presence, frequency_penalty=frequency)
    assert got == _reference_greedy(model, prompt, 16, presence, frequency)


def test_penalize_counts_output_tokens_only_and_leaves_the_input_alone() -> None:
    logits = torch.tensor([1.0, -2.0, 3.0, 0.5])
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0)
    got = penalize(logits, params, prompt=[3], output=[2, 2, 1])
    # repetition: 2 -> 1.5 (positive, divided), 1 -> -4 (negative, multiplied), 3 -> 0.25; then
    # frequency and presence over the output: 2 seen twice, 1 once.
    assert torch.allclose(got, torch.tensor([1.0, -4.0 - 0.25 - 0.5, 1.5 - 0.5 - 0.5, 0.25]))
    assert torch.equal(logits, torch.tensor([1.0, -2.0, 3.0, 0.5]))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("presence_penalty", float("nan")),
    ],
)
def test_penalties_out_of_range_are_refused(field: str, value: float) -> None:
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**{field: value})  # type: ignore[arg-type]


def test_the_server_honours_penalties_and_names_bad_ones() -> None:
    import dataclasses

    from test_server import ByteTokenizer, _client

    served = dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    body = {"prompt": "penalize me", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "repetition_penalty": 1.3}
    prompt = list(b"penalize me")
    expected = _engine_greedy(served, prompt, 10, **penalties)
    assert expected != _engine_greedy(served, prompt, 10)
    with _client(served) as client:
        r = client.post("/v1/completions", json={**body, **penalties})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == ByteTokenizer().decode(expected)
        for field, value in (
            ("presence_penalty", 2.5),
            ("frequency_penalty", -2.5),
            ("repetition_penalty", 0),
        ):
            r = client.post("/v1/completions", json={**body, field: value})
            assert r.status_code == 400 and field in r.text, r.text


def test_logit_bias_is_added_after_penalties(model: LoadedModel) -> None:
    prompt = random_prompt(20, 9)
    plain = _engine_greedy(model, prompt, 6)
    forced = _engine_greedy(model, prompt, 6, logit_bias=((17, 100.0),))
    assert plain != [17] * 6 and forced == [17] * 6
    banned = _engine_greedy(model, prompt, 6, logit_bias=tuple((t, -100.0) for t in set(plain)))
    assert not set(banned) & set(plain)
    logits = torch.tensor([0.0, 1.0, 2.0])
    got = penalize(logits, SamplingParams(logit_bias={0: 5.0, 2: -1.5}), prompt=[], output=[])  # type: ignore[arg-type]
    assert torch.equal(got, torch.tensor([5.0, 1.0, 0.5]))
    for bad in ({-1: 1.0}, {3: 101.0}):
        with pytest.raises(InvalidRequestError, match="logit_bias"):
            SamplingParams(logit_bias=bad)  # type: ignore[arg-type]


def test_the_server_honours_logit_bias_and_names_bad_ones() -> None:
    import dataclasses

    from test_server import ByteTokenizer, _client

    served = dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    body = {"prompt": "bias me", "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    with _client(served) as client:
        r = client.post("/v1/completions", json={**body, "logit_bias": {"65": 100}})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "AAAA", r.text
        for bad in ({"x": 1}, {"256": 1}, {"65": 150}, {"-3": 1}):
            r = client.post("/v1/completions", json={**body, "logit_bias": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
