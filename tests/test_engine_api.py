"""The engine's serving API: batch `generate`, async token streams, preemption, bad input.

References: transformers' `generate` on each prompt alone; the synchronous
engine for the async one. pytest-asyncio is not installed: each async test
runs its own event loop with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from pathlib import Path

import pytest
from conftest import hf_greedy
from test_engine import random_prompt

from kvengine.bench.throughput import measure_prefix_ttft, measure_throughput
from kvengine.cache.quant import KIVILayout
from kvengine.cli import main
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.async_engine import AsyncEngine
from kvengine.engine.engine import Engine, TokenEvent
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel

CACHE = CacheConfig(block_size=8, max_kv_bytes=16 * 2**20)


def pool_of(model: LoadedModel, blocks_per_cell: int, block: int = 4, **kwargs: object) -> CacheConfig:
    """A cache config whose pool holds `blocks_per_cell` blocks of `block` tokens for every cell."""
    cells = model.num_layers * model.num_kv_heads
    per_block = 2 * block * model.head_dim * 4
    return CacheConfig(block_size=block, max_kv_bytes=blocks_per_cell * cells * per_block, **kwargs)  # type: ignore[arg-type]


def test_generate_returns_outputs_in_order(tiny_llama: LoadedModel, no_leaks: list) -> None:
    engine = Engine(tiny_llama, CACHE)
    no_leaks.append(engine)
    prompts = [random_prompt(n, n) for n in (5, 40, 17)]
    params = [SamplingParams(max_tokens=k, ignore_eos=True) for k in (3, 8, 1)]
    outputs = engine.generate(prompts, params)
    for out, prompt, p in zip(outputs, prompts, params, strict=True):
        assert out.prompt_ids == prompt and out.finish_reason == "length"
        assert out.output_ids == hf_greedy(tiny_llama, prompt, p.max_tokens)
        assert out.ttft_s >= 0 and out.seq_id not in engine.sequences  # released
    with pytest.raises(InvalidRequestError, match="2 prompts but 1 sampling"):
        engine.generate(prompts[:2], params[:1])


def test_generate_queues_nothing_when_one_prompt_is_bad(tiny_llama: LoadedModel, no_leaks: list) -> None:
    engine = Engine(tiny_llama, CACHE)
    no_leaks.append(engine)
    with pytest.raises(InvalidRequestError, match="prompt token ids"):
        engine.generate([[1, 2, 3], [1, 999]])
    assert not engine.has_unfinished() and not engine.sequences


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_preemption_recomputes_to_the_same_tokens(
    tiny_llama: LoadedModel, prefix_cache: bool, no_leaks: list
) -> None:
    """Six requests of 20 + 40 tokens in a pool of 120 tokens per cell: two fit at their peak."""
    engine = Engine(tiny_llama, pool_of(tiny_llama, 30, prefix_cache=prefix_cache))
    prompts = [random_prompt(20, 300 + i) for i in range(6)]
    ids = [engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True)) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    assert engine.num_preemptions > 0
    for seq_id, prompt in zip(ids, prompts, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(tiny_llama, prompt, 40)
    if prefix_cache:  # a preempted request finds its own blocks again
        assert engine.prefix is not None and engine.prefix.num_hit_tokens > 0
        engine.prefix.evict(engine.pool.num_blocks)
    no_leaks.append(engine)


def test_a_request_the_pool_can_never_hold_is_rejected_at_once(
    tiny_llama: LoadedModel, no_leaks: list
) -> None:
    engine = Engine(tiny_llama, pool_of(tiny_llama, 16, prefix_cache=True))
    no_leaks.append(engine)
    with pytest.raises(InvalidRequestError, match="more KV memory than the pool holds"):
        engine.add_request(random_prompt(50, 1), SamplingParams(max_tokens=20))  # 70 tokens > 64
    # One that needs the whole pool still runs, next to others, and nothing deadlocks.
    big = random_prompt(44, 2)
    small = [random_prompt(6, 3 + i) for i in range(3)]
    outs = engine.generate([*small, big], SamplingParams(max_tokens=20, ignore_eos=True))
    for out, prompt in zip(outs, [*small, big], strict=True):
        assert out.output_ids == hf_greedy(tiny_llama, prompt, 20)
    assert engine.prefix is not None
    engine.prefix.evict(engine.pool.num_blocks)


def test_async_streams_match_the_sync_engine(tiny_llama: LoadedModel) -> None:
    prompts = [random_prompt(n, 50 + n) for n in (3, 30, 12, 64)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    expected = [o.output_ids for o in Engine(tiny_llama, CACHE).generate(prompts, params)]
    engine = Engine(tiny_llama, CACHE)

    async def collect(llm: AsyncEngine, prompt: list[int]) -> list[TokenEvent]:
        seq_id = await llm.add_request(prompt, params)
        return [event async for event in llm.stream(seq_id)]

    async def main_() -> list[list[TokenEvent]]:
        async with AsyncEngine(engine) as llm:
            return await asyncio.gather(*(collect(llm, p) for p in prompts))

    streams = asyncio.run(main_())
    for events, tokens in zip(streams, expected, strict=True):
        assert [e.token_id for e in events] == tokens
        assert [e.finished for e in events] == [False] * 9 + [True]
        assert events[-1].finish_reason == "length"
    assert engine.pool.num_used_blocks == 0 and not engine.sequences  # finished ones are released


def test_closing_a_stream_early_aborts_and_frees(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CACHE)

    async def main_() -> tuple[list[int], list[int], int]:
        async with AsyncEngine(engine) as llm:
            first: list[int] = []
            agen = llm.generate(random_prompt(30, 4), SamplingParams(max_tokens=100, ignore_eos=True))
            async for event in agen:
                first.append(event.token_id)
                if len(first) == 3:
                    break
            await agen.aclose()
            # The abort is applied before the next request is added: its blocks are back by then.
            other = [
                e.token_id async for e in llm.generate(random_prompt(9, 5), SamplingParams(max_tokens=2))
            ]
            return first, other, len(engine.sequences)

    first, other, num_left = asyncio.run(main_())
    assert len(first) == 3 and len(other) == 2
    assert num_left == 0 and engine.pool.num_used_blocks == 0


def test_async_bad_request_raises_and_others_go_on(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CACHE)

    async def main_() -> list[int]:
        async with AsyncEngine(engine) as llm:
            with pytest.raises(InvalidRequestError, match="the prompt is empty"):
                await llm.add_request([])
            with pytest.raises(InvalidRequestError, match="no request 99"):
                _ = [e async for e in llm.stream(99)]
            return [e.token_id async for e in llm.generate([5, 6, 7], SamplingParams(max_tokens=4))]

    assert len(asyncio.run(main_())) <= 4
    assert engine.pool.num_used_blocks == 0


def test_close_aborts_unfinished_requests(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CACHE)

    async def main_() -> list[TokenEvent]:
        llm = AsyncEngine(engine)
        llm.start()
        seq_id = await llm.add_request(random_prompt(20, 6), SamplingParams(max_tokens=500, ignore_eos=True))
        await llm.close()
        return [e async for e in llm.stream(seq_id)]

    events = asyncio.run(main_())
    assert all(not e.finished for e in events)  # ended by the abort, not by a last token
    assert engine.pool.num_used_blocks == 0 and not engine.sequences


def test_serving_benchmarks_run_and_check_their_tokens(tiny_llama: LoadedModel) -> None:
    res = measure_throughput(tiny_llama, [1, 2], prompt_len=16, new_tokens=4, baseline_requests=2)
    assert set(res["kvengine"]) == {1, 2} and res["transformers"] > 0
    assert res["tokens_match"] is True
    assert set(res["batched"]) == {1, 2} and res["batched_match"] == {1: True, 2: True}
    ttft = measure_prefix_ttft(tiny_llama, prefix_len=64, suffix_len=8, new_tokens=3, repeats=2)
    assert ttft["cached_tokens"] == [64, 64]  # the whole prefix, block-aligned, is reused
    assert ttft["outputs_agree"] == [True]


@pytest.mark.parametrize(
    ("options", "runner", "expected"),
    [
        (
            "throughput",
            "run_throughput_bench",
            dict(concurrency=[1, 4, 16, 32], prompt_len=256, new_tokens=64, baseline_requests=4),
        ),
        (
            "throughput --concurrency 2,3 --prompt-len 16 --new-tokens 5 --baseline-requests 1",
            "run_throughput_bench",
            dict(concurrency=[2, 3], prompt_len=16, new_tokens=5, baseline_requests=1),
        ),
        ("prefix", "run_prefix_bench", dict(prefix_len=2048, suffix_len=32, new_tokens=8, repeats=3)),
        (
            "prefix --prefix-len 64 --suffix-len 4 --new-tokens 2 --repeats 1",
            "run_prefix_bench",
            dict(prefix_len=64, suffix_len=4, new_tokens=2, repeats=1),
        ),
    ],
)
def test_serving_bench_options_reach_the_runner(
    options: str, runner: str, expected: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kvengine bench throughput|prefix` hands each option (or its documented default) to its runner."""
    from kvengine.bench import throughput

    real = getattr(throughput, runner)
    calls: list[dict] = []

    def record(*args: object, **kwargs: object) -> list[dict]:
        calls.append(inspect.signature(real).bind(*args, **kwargs).arguments)  # the real call must bind
        return []

    monkeypatch.setattr(throughput, runner, record)
    files = ["--model", "some-model", "--out", str(tmp_path / "r.jsonl"), "--report", str(tmp_path / "r.md")]
    assert main(["bench", *options.split(), *files]) == 0
    (got,) = calls
    assert {name: got[name] for name in expected} == expected
    assert "some-model" in got.values()
    assert [v for v in got.values() if isinstance(v, Path)] == [tmp_path / "r.jsonl", tmp_path / "r.md"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "throughput", "--concurrency", "4,x"], "expected an integer"),
        (["bench", "throughput", "--concurrency", "0"], "must be >= 1"),
        (["bench", "prefix", "--prefix-len", "-3"], "must be >= 1"),
        (["generate", "hi", "--prefix-cache", "--eviction-policy", "belady"], "unknown eviction policy"),
    ],
)
def test_bad_serving_arguments_exit_2_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def _run_to_the_end(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Step `engine` over `prompts` (added together), checking its invariants after every step."""
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    assert all(engine.sequences[i].finish_reason == "length" for i in ids)
    return [engine.release(i).output_ids for i in ids]


def test_a_packed_pool_holds_what_a_plain_one_preempts_and_answers_as_alone(
    tiny_llama: LoadedModel, no_leaks: list
) -> None:
    """The six requests of `test_preemption_recomputes_to_the_same_tokens`, in the bytes of its pool.

    There the float pool must preempt; packed 4-bit blocks take 144 of a float block's 512 bytes,
    so the KIVI pool holds all six at once, never preempts, and batching changes no answer
    (reference: each request alone).
    """
    prompts = [random_prompt(20, 300 + i) for i in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    packed_config = dataclasses.replace(pool_of(tiny_llama, 30), kv_bits=4)
    packed = Engine(tiny_llama, packed_config)
    no_leaks.append(packed)
    outputs = _run_to_the_end(packed, prompts, params)
    assert packed.num_preemptions == 0
    alone = Engine(tiny_llama, packed_config)
    assert outputs == [_run_to_the_end(alone, [p], params)[0] for p in prompts]


@pytest.mark.xfail(
    strict=True,
    reason="known bug, left for its own issue: a KIVI pool reserves blocks against open + packed blocks "
    "together, so requests are admitted that the packed blocks cannot hold, and they end in an error",
)
def test_a_packed_pool_short_of_packed_blocks_makes_requests_wait(tiny_llama: LoadedModel) -> None:
    """Packed blocks for one request of 20 + 40 tokens at a time: the others must wait, not fail."""
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    packed_block = KIVILayout(4, tiny_llama.head_dim, 4).packed_bytes
    config = CacheConfig(block_size=4, max_kv_bytes=15 * cells * packed_block, kv_bits=4)
    engine = Engine(tiny_llama, config, SchedulerConfig(max_num_seqs=4))
    prompts = [random_prompt(20, 300 + i) for i in range(3)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    alone = Engine(tiny_llama, dataclasses.replace(config, max_kv_bytes=2**20))
    assert _run_to_the_end(engine, prompts, params) == [
        _run_to_the_end(alone, [p], params)[0] for p in prompts
    ]
