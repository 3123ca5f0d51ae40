"""n > 1 choices from one prefill (`Engine.add_parallel`) and the server's `n` / `best_of`.

References: each shared choice against the same request run on its own (greedy: token for
token; seeded sampling: the same draw), and the pool's blocks with and without sharing.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import tiny_model
from test_engine import random_prompt

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import RequestOutput, SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return tiny_model("llama")


def _engine(model: LoadedModel, **cache: object) -> Engine:
    return Engine(model, CacheConfig(max_kv_bytes=16 * 2**20, **cache))  # type: ignore[arg-type]


def _run(engine: Engine, ids: list[int]) -> list[RequestOutput]:
    engine.run()
    return [RequestOutput.of(engine.release(i)) for i in ids]


def _sampled(seed: int, max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_shared_choices_equal_requests_run_alone(model: LoadedModel, prefix_cache: bool) -> None:
    prompt = random_prompt(70, 3)
    params = [_sampled(seed) for seed in (5, 6, 7, 8)] + [SamplingParams(max_tokens=12, ignore_eos=True)]
    engine = _engine(model, prefix_cache=prefix_cache)
    shared = _run(engine, engine.add_parallel(prompt, params))
    alone = [_engine(model).generate([prompt], p)[0] for p in params]
    assert [o.output_ids for o in shared] == [o.output_ids for o in alone]
    assert len({tuple(o.output_ids) for o in shared[:4]}) > 1  # different seeds, different draws
    assert not engine.sequences and not engine.shared_prompts  # the context went with its last request
    engine.check_invariants()
    if not prefix_cache:
        assert engine.pool.num_used_blocks == 0


def test_the_prompt_blocks_are_held_once(model: LoadedModel) -> None:
    """After the prefill, n forks hold the prompt's full blocks once; n requests alone hold them n times."""
    prompt, n = random_prompt(300, 4), 4
    params = [_sampled(seed, max_tokens=4) for seed in range(n)]
    shared, alone = _engine(model), _engine(model)
    ids = shared.add_parallel(prompt, params)
    for p in params:
        alone.add_request(prompt, p)
    while any(not s.is_context and not s.output_ids for s in shared.sequences.values()):
        shared.step()
    while any(not s.output_ids for s in alone.sequences.values()):
        alone.step()
    cells = model.num_layers * model.num_kv_heads
    one_prompt = shared.cache.blocks_for_tokens(len(prompt))
    # The context's blocks, plus each fork's copy of every cell's last (partly filled) block.
    assert shared.pool.num_used_blocks <= one_prompt + n * cells
    assert alone.pool.num_used_blocks >= n * one_prompt
    _run(shared, ids)
    assert shared.pool.num_used_blocks == 0


def test_aborting_choices_frees_the_shared_prompt(model: LoadedModel) -> None:
    engine = _engine(model)
    ids = engine.add_parallel(random_prompt(80, 5), [_sampled(s, 30) for s in range(3)])
    engine.step()  # the context prefills; no choice has a token yet
    engine.abort(ids[0])
    engine.release(ids[0])
    while not engine.sequences[ids[1]].output_ids:
        engine.step()
    for seq_id in ids[1:]:
        engine.abort(seq_id)
        engine.release(seq_id)
    assert not engine.sequences and engine.pool.num_used_blocks == 0
    # Every choice ended before the context was ready: it goes too.
    ids = engine.add_parallel(random_prompt(80, 6), [_sampled(s) for s in range(2)])
    for seq_id in ids:
        engine.abort(seq_id)
        engine.release(seq_id)
    assert not engine.sequences and engine.pool.num_used_blocks == 0


def test_a_refused_prompt_leaves_nothing_queued(model: LoadedModel) -> None:
    engine = _engine(model)
    too_long = random_prompt(model.max_context_len, 7)
    with pytest.raises(InvalidRequestError, match="context"):
        engine.add_parallel(too_long, [_sampled(s) for s in range(3)])
    assert not engine.sequences and engine.pool.num_used_blocks == 0


def test_one_token_prompts_and_prompt_scoring_run_alone(model: LoadedModel) -> None:
    engine = _engine(model)
    ids = engine.add_parallel([9], [_sampled(s, 3) for s in range(2)])
    scored = SamplingParams(max_tokens=2, prompt_logprobs=1)
    ids += engine.add_parallel(random_prompt(20, 8), [scored, scored])
    assert not engine.shared_prompts  # none of them shares a context
    outs = _run(engine, ids)
    assert outs[2].prompt_logprobs == outs[3].prompt_logprobs is not None


# ---- the server ----------------------------------------------------------------------------


def _served() -> LoadedModel:
    from test_server import ByteTokenizer

    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def test_the_server_samples_n_choices_from_one_prompt() -> None:
    from test_server import _client

    served = _served()
    body = {
        "prompt": "share this prompt",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 11,
        "ignore_eos": True,
    }
    with _client(served) as client:
        r = client.post("/v1/completions", json={**body, "n": 3})
        assert r.status_code == 200, r.text
        out = r.json()
        singles = []
        for i in range(3):
            one = client.post("/v1/completions", json={**body, "seed": 11 + i}).json()
            singles.append(one["choices"][0]["text"])
        assert [c["index"] for c in out["choices"]] == [0, 1, 2]
        assert [c["text"] for c in out["choices"]] == singles
        assert out["usage"]["prompt_tokens"] == len(b"share this prompt")  # counted once
        assert out["usage"]["completion_tokens"] == 24
        # Two prompts, two choices each: indexed prompt by prompt.
        r = client.post("/v1/completions", json={**body, "prompt": ["ab", "cd"], "n": 2})
        assert [c["index"] for c in r.json()["choices"]] == [0, 1, 2, 3]
        assert r.json()["usage"]["prompt_tokens"] == 4
        stream = client.post("/v1/chat/completions", json=_chat(n=2, stream=True))
        indices = {e["choices"][0]["index"] for e in _events(stream.text) if e.get("choices")}
        assert indices == {0, 1}
        assert client.engine.pool.num_used_blocks == 0  # type: ignore[attr-defined]


def _chat(**fields: object) -> dict:
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 1.0, **fields}


def _events(text: str) -> list[dict]:
    from test_server import _events as events

    return [e for e in events(text) if isinstance(e, dict)]


def test_best_of_returns_the_most_likely_choice() -> None:
    from test_server import _client

    served = _served()
    body = {"prompt": "rank these", "max_tokens": 6, "temperature": 1.5, "seed": 3, "ignore_eos": True}
    with _client(served) as client:
        r = client.post("/v1/completions", json={**body, "best_of": 4})
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert choice["logprobs"] is None  # ranked by log-probabilities it was not asked to show
        assert r.json()["usage"]["completion_tokens"] == 24  # every candidate is paid for
        scored = []
        for i in range(4):
            one = client.post("/v1/completions", json={**body, "seed": 3 + i, "logprobs": 0}).json()
            lps = one["choices"][0]["logprobs"]["token_logprobs"]
            scored.append((sum(lps) / len(lps), one["choices"][0]["text"]))
        assert choice["text"] == max(scored)[1]
        for bad, param in (({"best_of": 1, "n": 2}, "best_of"), ({"best_of": 3, "stream": True}, "best_of")):
            r = client.post("/v1/completions", json={**body, **bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
        r = client.post("/v1/completions", json={**body, "n": 0})
        assert r.status_code == 400 and "n" in r.text
