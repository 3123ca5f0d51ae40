"""Real processes sharing a real Redis: a prefix one computes is hit by the next; Redis dying mid-run.

Process A and process B are separate Python processes (`kvengine bench tiers --child`,
started by `kvengine.bench.tiers.spawn_child`) over a tiny random model saved to a directory; only the Redis
server is shared between them. The reference for B's output is A's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model
from redis_server import RedisServer, redis_server  # noqa: F401  (fixture)
from test_engine import random_prompt

from kvengine.bench.tiers import spawn_child
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel

PREFIX_LEN = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").hf_model.save_pretrained(path)
    return path


def test_process_b_hits_what_process_a_stored_in_redis(model_dir: Path, redis_server: RedisServer) -> None:  # noqa: F811
    options = json.dumps({"tiers": "redis", "redis_url": redis_server.url, "block_size": 16})
    args = [str(model_dir), options, str(PREFIX_LEN), "0", "8"]
    a = spawn_child(args)
    b = spawn_child(args)
    assert a["cached_tokens"] == 0 and a["stats"]["tier_stored_chunks_total"] >= PREFIX_LEN // 16
    assert b["cached_tokens"] >= PREFIX_LEN  # the prefix and whole blocks of the question
    assert b["stats"]["prefix_tier_hit_tokens_total"] >= b["cached_tokens"]  # and the warm-up prompt's
    assert b["stats"]["prefill_tokens_total"] < a["stats"]["prefill_tokens_total"] - PREFIX_LEN + 16
    assert b["output"] == a["output"]


def _generate(engine: Engine, prompt: list[int]) -> list[int]:
    out = engine.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True))[0]
    engine.check_invariants()
    return out.output_ids


def test_redis_killed_mid_run_is_served_without_it(redis_server: RedisServer) -> None:  # noqa: F811
    model: LoadedModel = tiny_model("llama")
    cache = CacheConfig(
        block_size=4, max_kv_bytes=1 << 22, prefix_cache=True, tiers="redis", redis_url=redis_server.url
    )
    engine = Engine(model, cache, SchedulerConfig(max_step_tokens=256))
    first, second = random_prompt(40, 11), random_prompt(40, 12)
    expected = [
        Engine(model).generate([p], SamplingParams(max_tokens=6, ignore_eos=True))[0].output_ids
        for p in (first, second)
    ]
    assert _generate(engine, first) == expected[0]
    redis_server.stop()
    try:
        assert engine.prefix is not None
        engine.prefix.evict(engine.pool.num_blocks)  # nothing left in the pool: the tier would be next
        assert _generate(engine, first) == expected[0]
        assert _generate(engine, second) == expected[1]
        engine.close()
        stats = engine.stats()
        assert stats["tier_redis_errors_total"] >= 1
        assert not any(k.startswith("tier_faults") for k in stats)
    finally:
        redis_server.start()
