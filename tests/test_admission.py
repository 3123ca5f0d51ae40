"""Admission never hands out blocks promised elsewhere, tier loads included.

A request admitted in a step may load its prefix's chunks from a storage
tier into free pool blocks. Those blocks must not be the ones this step's
plan already counts on for running sequences (nor what admitted sequences
reserved): otherwise the forward pass finds the pool short and the whole
step fails (issue 14, item 4: "a step needed 3,960 blocks with 1,670 free").
"""

from __future__ import annotations

from conftest import tiny_model
from test_engine import random_prompt

from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams

BLOCK = 4
PARAMS = SamplingParams(max_tokens=3, ignore_eos=True)


def test_tier_loads_leave_this_steps_blocks_free() -> None:
    model = tiny_model("llama")
    cells = model.num_layers * model.num_kv_heads  # 6 blocks per 4 tokens
    per_block = 2 * BLOCK * model.head_dim * 4
    cached = random_prompt(200, 1)  # 50 chunks of 6 blocks in the host tier
    running = random_prompt(40, 2)  # prefilled in chunks of 32, then 8 tokens (12 blocks)
    # Room for the cached prompt's 300 blocks, the running prompt's first chunk (48) and 6 more:
    # loading every cached chunk after that first chunk leaves 6 free where the step needs 12.
    num_blocks = 50 * cells + 8 * cells + 6
    config = CacheConfig(
        block_size=BLOCK, max_kv_bytes=num_blocks * per_block, prefix_cache=True, tiers="host"
    )
    engine = Engine(model, config, SchedulerConfig(max_step_tokens=32))
    expected = {
        "cached": Engine(model).generate([cached], PARAMS)[0].output_ids,
        "running": Engine(model).generate([running], PARAMS)[0].output_ids,
    }
    assert engine.generate([cached], PARAMS)[0].output_ids == expected["cached"]
    assert engine.prefix is not None and engine.prefix.tiers is not None
    engine.prefix.tiers.flush()  # write-through has reached the host tier
    engine.prefix.evict(engine.pool.num_blocks)  # the prompt is now only in the tier
    assert engine.pool.num_used_blocks == 0

    run_id = engine.add_request(running, PARAMS)
    engine.step()  # its first chunk of 32 tokens
    cached_id = engine.add_request(cached, PARAMS)  # admitted next step, with a tier hit
    while engine.has_unfinished():
        engine.step()
        assert not engine.step_errors, engine.step_errors
    assert engine.sequences[run_id].output_ids == expected["running"]
    assert engine.sequences[cached_id].output_ids == expected["cached"]
    assert engine.sequences[cached_id].num_cached_tokens > 0  # it did hit the tier
    engine.check_invariants()
