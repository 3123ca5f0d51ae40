"""`AsyncEngine`'s public API beyond token streams: request infos and stats snapshots.

References: the synchronous engine's `RequestOutput` for what a request's info
reports; `Engine.stats()` read while nothing steps, for the snapshots. Token
streams themselves are tested in test_engine_api.py. pytest-asyncio is not
installed: each test runs its own event loop with `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from test_engine import random_prompt

from kvengine.config import CacheConfig
from kvengine.engine.async_engine import AsyncEngine, RequestInfo
from kvengine.engine.engine import Engine, TokenEvent
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel

CACHE = CacheConfig(block_size=8, max_kv_bytes=16 * 2**20, prefix_cache=True)
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def test_infos_report_what_the_sync_engine_reports(tiny_llama: LoadedModel) -> None:
    prompts = [random_prompt(40, 1), random_prompt(40, 1), random_prompt(40, 1)[:20] + random_prompt(9, 2)]
    reference = Engine(tiny_llama, CACHE)
    expected = [reference.generate([p], PARAMS)[0] for p in prompts]  # one by one: later ones hit the cache
    assert [o.num_cached_tokens for o in expected] == [0, 32, 16]

    async def main_() -> list[tuple[RequestInfo, list[TokenEvent]]]:
        results = []
        async with AsyncEngine(Engine(tiny_llama, CACHE)) as llm:
            for prompt in prompts:
                seq_id = await llm.add_request(prompt, PARAMS)
                info = llm.info(seq_id)
                results.append((info, [e async for e in llm.stream(seq_id)]))
        return results

    for (info, events), out in zip(asyncio.run(main_()), expected, strict=True):
        assert [e.token_id for e in events] == out.output_ids
        assert info.num_cached_tokens == out.num_cached_tokens
        assert info.num_output_tokens == len(out.output_ids)
        assert info.finish_reason == out.finish_reason == "length"


def test_an_info_outlives_its_request_and_says_how_it_ended(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CACHE)

    async def main_() -> tuple[RequestInfo, int]:
        async with AsyncEngine(engine) as llm:
            seq_id = await llm.add_request(
                random_prompt(12, 3), SamplingParams(max_tokens=500, ignore_eos=True)
            )
            info = llm.info(seq_id)
            seen = 0
            async with contextlib.aclosing(llm.stream(seq_id)) as events:
                async for _ in events:
                    seen += 1
                    if seen == 3:
                        break  # and aclosing closes the stream: the request is aborted
            with pytest.raises(InvalidRequestError, match=f"no request {seq_id}"):
                llm.info(seq_id)  # the async engine has forgotten it; `info` has not
            return info, seen

    info, seen = asyncio.run(main_())
    assert info.finish_reason == "abort" and info.num_output_tokens >= seen == 3
    assert not engine.sequences


class _WatchedEngine(Engine):
    """Counts `stats()` calls, and those made while a step runs (there must be none)."""

    stepping = False
    num_stats_calls = 0
    num_calls_in_step = 0

    def step(self) -> list[TokenEvent]:
        self.stepping = True
        try:
            return super().step()
        finally:
            self.stepping = False

    def stats(self) -> dict[str, float]:
        self.num_stats_calls += 1
        self.num_calls_in_step += self.stepping
        return super().stats()


def test_stats_are_snapshots_taken_between_steps(tiny_llama: LoadedModel) -> None:
    engine = _WatchedEngine(tiny_llama, CACHE)

    async def main_() -> tuple[list[dict[str, float]], dict[str, float], dict[str, float]]:
        llm = AsyncEngine(engine)
        idle = llm.stats()
        seen = []
        async with llm:
            seq_id = await llm.add_request(random_prompt(30, 4), PARAMS)
            async for _ in llm.stream(seq_id):
                calls = engine.num_stats_calls
                seen.append(llm.stats())
                assert engine.num_stats_calls == calls  # read from the snapshot, not from the engine
            done = llm.stats()
        return seen, idle, done

    seen, idle, done = asyncio.run(main_())
    assert engine.num_calls_in_step == 0
    assert idle["requests_running"] == idle["pool_blocks_used"] == 0
    assert all(s["requests_running"] == 1 and s["pool_blocks_used"] > 0 for s in seen[:-1])
    assert seen[-1]["requests_running"] == 0  # taken right after the last step
    assert done == engine.stats()


def test_public_prefixes_are_added_before_the_driver_starts(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CACHE)
    prefix = random_prompt(16, 5)

    async def main_() -> int:
        llm = AsyncEngine(engine)
        llm.add_public_prefix(prefix)
        async with llm:
            with pytest.raises(RuntimeError, match="before the async engine starts"):
                llm.add_public_prefix(prefix)
            for salt in ("tenant-a", "tenant-b"):
                seq_id = await llm.add_request([*prefix, 7, 8], PARAMS, cache_salt=salt)
                info = llm.info(seq_id)
                _ = [e async for e in llm.stream(seq_id)]
        return info.num_cached_tokens

    assert asyncio.run(main_()) == 16  # tenant b reuses the public blocks tenant a cached


def test_every_step_runs_in_one_worker_thread_off_the_event_loop(tiny_llama: LoadedModel) -> None:
    """Steps (and adds) go to one thread, so one OpenMP team serves every step's kernels; the
    thread goes away at close."""
    import threading

    engine = Engine(tiny_llama, CACHE)
    seen: list[str] = []
    step = engine.step

    def recording_step() -> list[TokenEvent]:
        seen.append(threading.current_thread().name)
        return step()

    engine.step = recording_step  # type: ignore[method-assign]

    async def main_() -> None:
        async with AsyncEngine(engine) as llm:
            ids = [await llm.add_request(random_prompt(10 + i, i), PARAMS) for i in range(4)]
            for seq_id in ids:
                assert len([e async for e in llm.stream(seq_id)]) == PARAMS.max_tokens
            await asyncio.gather(
                *(asyncio.to_thread(lambda: None) for _ in range(8))
            )  # busy the default pool

    asyncio.run(main_())
    assert len(seen) >= PARAMS.max_tokens
    assert len(set(seen)) == 1 and seen[0].startswith("kvengine-step")
    assert not any(t.name.startswith("kvengine-step") for t in threading.enumerate())
