"""`kv_chunks` on /v1/completions: the same tokens as the Python API, assembly only between steps,
concurrent plain requests untouched, tenants apart, bad input a 400 that caches nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import httpx
import pytest
import torch
from conftest import tiny_model
from test_server import ByteTokenizer, _client, _engine, _live_server, _reference, _wait_until

from kvengine.config import CacheConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel
from kvengine.rag import BlendConfig, RagPrompt, dense, rag_generate
from kvengine.rag import api as rag_api
from kvengine.rag.chunks import ChunkStore


def _text(n: int, seed: int) -> list[int]:
    """`n` printable ASCII bytes (token ids of the byte tokenizer)."""
    return torch.randint(97, 123, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


HEAD, SEP = _text(6, 0), [10, 10]
DOCS = [_text(30, 1), _text(25, 2), _text(33, 3)]
QUESTION = _text(12, 4)


def _prompt(order: tuple[int, ...] = (0, 1, 2)) -> RagPrompt:
    ids, spans = list(HEAD), []
    for i, doc in enumerate(order):
        ids += SEP if i else []
        spans.append((len(ids), len(ids) + len(DOCS[doc])))
        ids += DOCS[doc]
    return RagPrompt(ids + SEP + QUESTION, tuple(spans))


def _body(prompt: RagPrompt, max_tokens: int = 6, **extra: object) -> dict:
    spans = [list(s) for s in prompt.spans]
    return {
        "prompt": prompt.token_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "kv_chunks": spans,
        **extra,
    }


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return dataclasses.replace(tiny_model("llama"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]


def _python_api(model: LoadedModel, prompt: RagPrompt, blend: BlendConfig, max_tokens: int = 6) -> str:
    """The text `rag_generate` gives on an engine like the server's."""
    engine = Engine(model, CacheConfig(block_size=4, max_kv_bytes=2**22, prefix_cache=True))
    params = SamplingParams(max_tokens=max_tokens)
    ids = rag_generate(engine, prompt, params, blend=blend).output.output_ids
    return bytes(ids).decode("utf-8", errors="replace")


def _text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


@pytest.mark.parametrize(
    ("kv_blend", "blend"),
    [
        (None, BlendConfig()),
        ({"mode": "reuse"}, BlendConfig("reuse")),
        ({"mode": "blend", "recompute_ratio": 0.3}, BlendConfig("blend", 0.3)),
        ({"mode": "full"}, BlendConfig("full")),
        ({"sink_tokens": 4, "anchor": "head"}, BlendConfig("blend", sink_tokens=4, anchor="head")),
        ({"mode": "reuse", "sink_tokens": 3}, BlendConfig("reuse", sink_tokens=3)),
    ],
)
def test_kv_chunks_give_the_tokens_of_the_python_api(model: LoadedModel, kv_blend, blend) -> None:
    prompt = _prompt((2, 0, 1))
    extra = {"kv_blend": kv_blend} if kv_blend else {}
    with _client(model, prefix_cache=True) as client:
        first = _text_of(client.post("/v1/completions", json=_body(prompt, **extra)))
        again = _text_of(client.post("/v1/completions", json=_body(prompt, **extra)))  # chunks from the store
        engine = client.engine  # type: ignore[attr-defined]
        assert _wait_until(lambda: not engine.sequences)
        engine.check_invariants()
        assert engine.pool.num_used_blocks == engine.prefix.num_evictable_blocks  # only cached blocks left
    assert first == again == _python_api(model, prompt, blend)


def test_full_recompute_through_http_equals_a_plain_completion(model: LoadedModel) -> None:
    prompt = _prompt()
    with _client(model, prefix_cache=True) as client:
        body = _body(prompt, 8, kv_blend={"recompute_ratio": 1.0})
        got = _text_of(client.post("/v1/completions", json=body))
        stream = client.post("/v1/completions", json={**body, "stream": True})
        assert stream.text.endswith("data: [DONE]\n\n")
    plain = _reference(model, bytes(prompt.token_ids).decode(), 8)
    assert got == plain
    assert "".join(_deltas(stream.text)) == plain


def _deltas(text: str) -> list[str]:
    from test_server import _events

    return [e["choices"][0]["text"] for e in _events(text) if e["choices"]]


def test_assembly_runs_between_steps_and_plain_requests_are_unaffected(
    model: LoadedModel, monkeypatch
) -> None:
    """Plain streams decode while a kv_chunks request is assembled; their tokens equal the same requests alone."""
    plain = {f"plain request {i} " * 3: 120 for i in range(3)}
    expected = {p: _reference(model, p, n) for p, n in plain.items()}
    engine = _engine(model, prefix_cache=True)
    stepping, assembling, seen = threading.Event(), threading.Event(), []
    step, assemble = engine.step, rag_api.assemble

    def watched_step():  # type: ignore[no-untyped-def]
        assert not assembling.is_set(), "a step ran during an assembly"
        stepping.set()
        try:
            return step()
        finally:
            stepping.clear()

    def watched_assemble(*args, **kwargs):  # type: ignore[no-untyped-def]
        assert not stepping.is_set(), "an assembly started during a step"
        assembling.set()
        seen.append(len(engine.scheduler.running))
        try:
            return assemble(*args, **kwargs)
        finally:
            assembling.clear()

    monkeypatch.setattr(engine, "step", watched_step)
    monkeypatch.setattr(rag_api, "assemble", watched_assemble)
    got: dict[str, str] = {}
    with _live_server(model, engine) as url:

        def run(prompt: str, n: int) -> None:
            body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            got[prompt] = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0][
                "text"
            ]

        threads = [threading.Thread(target=run, args=item) for item in plain.items()]
        for t in threads:
            t.start()
        assert _wait_until(lambda: len(engine.scheduler.running) == len(plain))
        r = httpx.post(
            url + "/v1/completions", json=_body(_prompt(), kv_blend={"recompute_ratio": 0.3}), timeout=60
        )
        assert r.status_code == 200, r.text
        for t in threads:
            t.join(timeout=60)
        assert _wait_until(lambda: not engine.sequences)
    assert seen and seen[0] > 0  # assembled while plain requests were running
    assert got == expected
    assert model.hf_model.config._attn_implementation == "kvengine"
    assert _text_of(r) == _python_api(model, _prompt(), BlendConfig("blend", 0.3))
    engine.check_invariants()


def test_a_failed_assembly_restores_attention_and_leaves_nothing(model: LoadedModel, monkeypatch) -> None:
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("boom in the recompute forward")

    monkeypatch.setattr(dense._InPlaceLayer, "update", broken)
    engine = _engine(model, prefix_cache=True)
    with _live_server(model, engine) as url:
        r = httpx.post(url + "/v1/completions", json=_body(_prompt()), timeout=60)
        assert r.status_code == 500, r.text
        assert model.hf_model.config._attn_implementation == "kvengine"
        body = {"prompt": "after the failure", "max_tokens": 5, "temperature": 0}
        ok = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert ok.json()["choices"][0]["text"] == _reference(model, "after the failure", 5)
        assert _wait_until(lambda: not engine.sequences)
    engine.check_invariants()
    assert engine.pool.num_used_blocks == engine.prefix.num_evictable_blocks


def test_a_tenant_never_reads_another_tenants_chunks(model: LoadedModel, monkeypatch) -> None:
    queued: list[int] = []
    queue = ChunkStore.queue

    def counted(self, chunks, cache_salt):  # type: ignore[no-untyped-def]
        ids = queue(self, chunks, cache_salt)
        queued.append(len(ids))
        return ids

    monkeypatch.setattr(ChunkStore, "queue", counted)
    body = _body(_prompt(), kv_blend={"mode": "reuse"})
    with _client(model, prefix_cache=True, api_keys=("key-a", "key-b")) as client:

        def post(key: str) -> list[int]:
            return _text_of(
                client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
            )

        a = post("key-a")
        assert post("key-a") == a
        assert post("key-b") == a  # the same tokens, from its own chunks
    assert queued == [4, 0, 4]  # head + 3 documents computed for a, read again by a, computed again for b


@pytest.mark.parametrize(
    ("change", "param", "match"),
    [
        ({"kv_chunks": [[6, 36], [30, 60]]}, "kv_chunks", "overlap"),
        (
            {"kv_chunks": [[0, 2000]]},
            "kv_chunks",
            "not a span",
        ),  # longer than the context: past the prompt too
        ({"kv_chunks": [[6, 112]]}, "kv_chunks", "must follow the last chunk"),
        ({"kv_chunks": []}, "kv_chunks", "non-empty"),
        ({"kv_chunks": [[1, 2, 3]]}, "kv_chunks", r"\[start, end\]"),
        ({"n": 2}, "kv_chunks", "n = 1"),
        ({"kv_press": "knorm"}, "kv_chunks", "kv_press"),
        ({"prompt": ["ab", "cd"]}, "kv_chunks", "one prompt"),
        ({"kv_blend": {"mode": "cacheblend"}}, "kv_blend", None),
        ({"kv_blend": {"recompute_ratio": 1.5}}, "kv_blend", None),
        ({"kv_blend": {"anchor": "tail"}}, "kv_blend", None),
        ({"kv_blend": {"sink_tokens": -1}}, "kv_blend", None),
    ],
)
def test_bad_kv_chunks_are_a_400_naming_the_field(
    model: LoadedModel, change: dict, param: str, match
) -> None:
    with _client(model, prefix_cache=True) as client:
        r = client.post("/v1/completions", json={**_body(_prompt()), **change})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"].split(".")[0] == param
        if match:
            assert pytest.importorskip("re").search(match, error["message"]), error["message"]
        engine = client.engine  # type: ignore[attr-defined]
        assert engine.pool.num_used_blocks == 0 and not engine.sequences  # nothing computed, nothing cached


def test_kv_blend_without_kv_chunks_and_engines_that_cannot_are_refused(model: LoadedModel) -> None:
    plain = {"prompt": "hello", "max_tokens": 2, "kv_blend": {"mode": "reuse"}}
    with _client(model, prefix_cache=True) as client:
        r = client.post("/v1/completions", json=plain)
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_blend"
    with _client(model, prefix_cache=False) as client:  # chunks live in the prefix cache
        r = client.post("/v1/completions", json=_body(_prompt()))
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_chunks", r.text
        assert "prefix-cache" in r.json()["error"]["message"]
        assert client.engine.pool.num_used_blocks == 0  # type: ignore[attr-defined]
    windowed = dataclasses.replace(tiny_model("mistral"), tokenizer=ByteTokenizer())  # type: ignore[arg-type]
    with _client(windowed, prefix_cache=True) as client:
        r = client.post("/v1/completions", json=_body(_prompt()))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "kv_chunks" and "sliding-window" in r.json()["error"]["message"]
        assert client.engine.pool.num_used_blocks == 0 and not client.engine.sequences  # type: ignore[attr-defined]


def test_add_with_a_caller_that_leaves_mid_work_ends_its_requests(model: LoadedModel) -> None:
    """`AsyncEngine.add_with(..., in_thread=True)`: the driver waits for the work; if its caller left, the work's
    requests are ended, and the driver goes on serving."""
    engine = _engine(model)
    started, go_on = threading.Event(), threading.Event()

    def work(e: Engine) -> list[int]:
        started.set()
        go_on.wait(10)
        return [e.add_request(list(b"abc"), SamplingParams(max_tokens=50))]

    async def main() -> list[int]:
        async with AsyncEngine(engine) as llm:
            task = asyncio.create_task(llm.add_with(work, in_thread=True))
            await asyncio.to_thread(started.wait, 10)
            task.cancel()
            go_on.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            (seq_id,) = await llm.add_with(
                lambda e: [e.add_request(list(b"xyz"), SamplingParams(max_tokens=3))]
            )
            return [event.token_id async for event in llm.stream(seq_id)]

    tokens = asyncio.run(main())
    assert bytes(tokens).decode("utf-8", errors="replace") == _reference(model, "xyz", 3)
    assert not engine.sequences and engine.pool.num_used_blocks == 0
