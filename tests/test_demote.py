"""Demote instead of evict: the byte plan against brute force, bytes held, and demoted tokens
still attended (the engine's next-token logits = transformers on the dequantized cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model, use_sdpa
from test_engine import random_prompt
from transformers import DynamicCache

from kvengine.cache.demote import DemotionPlan, demote_layer, plan_demotion
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.runner import StepInput
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press import make_press, press_from_spec
from kvengine.press.demote import DemotePress

PACKED = CacheConfig(block_size=8, max_kv_bytes=8 * 2**20, kv_bits=2)


def brute_force_plan(t: int, reserved: int, budget: float, bs: int, o: int, p: int) -> DemotionPlan | None:
    """Of every split (important >= reserved, demoted whole blocks) within the budget, the one that
    keeps the most tokens, then the most in full precision; None when none fits."""
    limit = budget * t * o / bs
    best = None
    for imp in range(min(reserved, t), t + 1):
        for m in range((t - imp) // bs + 1):
            plan = DemotionPlan(imp, m * bs)
            if plan.bytes_held(bs, o, p) <= limit and (
                best is None
                or (imp + m * bs, imp) > (best.num_important + best.num_demoted, best.num_important)
            ):
                best = plan
    return best


@pytest.mark.parametrize("t", [5, 37, 64, 100])
@pytest.mark.parametrize("budget", [0.05, 0.125, 0.25, 0.5, 1.0])
@pytest.mark.parametrize(("o", "p"), [(256, 40), (512, 96), (100, 99)])
def test_plan_is_the_best_split_within_the_budget(t: int, budget: float, o: int, p: int) -> None:
    bs, reserved = 8, 6
    expected = brute_force_plan(t, reserved, budget, bs, o, p)
    if expected is None:
        with pytest.raises(
            InvalidRequestError, match=r"below the \d+ bytes that \d sink and window tokens need"
        ):
            plan_demotion(t, reserved, budget, bs, o, p)
        return
    plan = plan_demotion(t, reserved, budget, bs, o, p)
    assert plan.num_demoted % bs == 0 and plan.bytes_held(bs, o, p) <= budget * t * o / bs
    assert (plan.num_important + plan.num_demoted, plan.num_important) == (
        expected.num_important + expected.num_demoted,
        expected.num_important,
    )


def demoted_context(model: LoadedModel, ratio: float, n: int = 97) -> tuple[Engine, int]:
    engine = Engine(model, PACKED)
    ctx = engine.add_context(random_prompt(n, 3), make_press("demote", ratio=ratio, n_sink=2, window=4))
    engine.run()
    return engine, ctx


@pytest.mark.parametrize("ratio", [0.75, 0.85, 0.9])
def test_bytes_held_stay_within_the_budget_and_tokens_are_kept(ratio: float) -> None:
    m = tiny_model("llama")
    engine, ctx = demoted_context(m, ratio)
    kv = engine.sequences[ctx].kv
    assert kv is not None
    pool = engine.pool
    per_head_limit = (1 - ratio) * 97 * pool.open_bytes_per_block / PACKED.block_size
    cells = m.num_layers * m.num_kv_heads
    assert engine.cache.bytes_held(kv) == pool.bytes_in_use <= cells * per_head_limit
    plan = plan_demotion(97, 6, 1 - ratio, 8, pool.open_bytes_per_block, pool.packed_bytes_per_block)
    assert kv.lens.unique().tolist() == [plan.num_important + plan.num_demoted]
    assert pool.num_used_packed_blocks == cells * plan.num_demoted // 8
    assert pool.num_pinned_blocks == pool.num_used_open_blocks == cells * -(-plan.num_important // 8)
    if ratio == 0.75:
        assert plan.num_important + plan.num_demoted > 97 - 8  # a quarter of the bytes: < a block evicted
    pool.check_invariants()
    engine.release(ctx)
    assert pool.num_used_blocks == 0 and pool.num_pinned_blocks == 0
    pool.check_invariants()


def hf_next_logits(model: LoadedModel, engine: Engine, kv: object, token: int, pos: int) -> torch.Tensor:
    """transformers' logits for `token` at `pos` after the cache's keys and values (as read back)."""
    cache = DynamicCache()
    for layer in range(model.num_layers):
        slots, lens = kv.context(layer)  # type: ignore[attr-defined]
        assert lens is None
        k, v = engine.pool.read(slots.reshape(-1))
        shape = (1, *slots.shape, -1)  # (1, H_kv, T, D)
        cache.update(k.view(shape), v.view(shape), layer)
    num_cached = int(kv.lens.max())  # type: ignore[attr-defined]
    with use_sdpa(model) as hf, torch.inference_mode():
        out = hf(
            torch.tensor([[token]]),
            position_ids=torch.tensor([[pos]]),
            past_key_values=cache,
            attention_mask=torch.ones(1, num_cached + 1, dtype=torch.long),
        )
    return out.logits[0, -1].float()


def test_a_demoted_token_is_still_attended() -> None:
    """After demotion, the next token's logits are transformers' over every kept token, demoted ones
    at their dequantized values; dropping the demoted tokens instead gives other logits."""
    m = tiny_model("llama")
    prompt = random_prompt(96, 5)
    engine = Engine(m, PACKED)
    kv = engine.cache.new_sequence()
    engine.runner.forward([StepInput(kv, prompt, 0, keep_queries=True, seal=False)])
    queries = {layer: torch.zeros(m.config.num_attention_heads, 1, m.head_dim) for layer in range(3)}
    engine.runner.compress(kv, queries, DemotePress(ratio=0.7, n_sink=2, window=4))
    assert engine.pool.num_used_packed_blocks > 0 and int(kv.lens.min()) == 96  # demoted, none evicted
    masks = [demotion_mask(engine, kv, layer) for layer in range(m.num_layers)]
    assert 0 < int(masks[0][0].sum()) < 96
    expected = hf_next_logits(m, engine, kv, 11, 96)
    got = engine.runner.forward([StepInput(kv, [11], 96)])[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # The same cache with the demoted tokens evicted: another answer, so they counted.
    evicted = engine.cache.new_sequence()
    engine.runner.forward([StepInput(evicted, prompt, 0, keep_queries=True, seal=False)])
    for layer in range(m.num_layers):
        engine.cache.retain(evicted, layer, [(~mask).nonzero().squeeze(1) for mask in masks[layer]])
    without = engine.runner.forward([StepInput(evicted, [11], 96)])[0]
    assert float((without - got).abs().max()) > 100 * float((got - expected).abs().max())


def demotion_mask(engine: Engine, kv: object, layer: int) -> list[torch.Tensor]:
    """Per head of `layer`: which positions 0..T-1 were demoted (live in sealed blocks)."""
    masks = []
    for head in range(engine.cache.num_kv_heads):
        n = int(kv.lens[layer, head])  # type: ignore[attr-defined]
        sealed = engine.pool.is_sealed(kv.slots[layer, head, :n] // engine.cache.block_size)  # type: ignore[attr-defined]
        mask = torch.zeros(n, dtype=torch.bool)
        mask[kv.positions[layer, head, :n][sealed]] = True  # type: ignore[attr-defined]
        masks.append(mask)
    return masks


def test_ratio_zero_keeps_the_full_precision_cache() -> None:
    """Budget 1: every token important, nothing packed: the same tokens as the float cache."""
    m = tiny_model("llama")
    prompt = random_prompt(40, 6)
    outputs = []
    for cfg, press in [(PACKED, DemotePress(ratio=0.0)), (CacheConfig(block_size=8), None)]:
        engine = Engine(m, cfg)
        from kvengine.engine.request import SamplingParams

        ctx = engine.add_context(prompt, press)
        engine.run()
        if press is not None:
            assert engine.pool.num_used_packed_blocks == 0
        seq = engine.add_request([5], SamplingParams(max_tokens=6, ignore_eos=True), parent=ctx)
        engine.run()
        outputs.append(engine.release(seq).output_ids)
    assert outputs[0] == outputs[1]


def test_demote_on_an_unpacked_cache_evicts_at_the_same_bytes() -> None:
    m = tiny_model("llama")
    engine = Engine(m, CacheConfig(block_size=8))
    ctx = engine.add_context(random_prompt(97, 3), press_from_spec("demote:snapkv", 0.75))
    engine.run()
    kv = engine.sequences[ctx].kv
    assert kv is not None and kv.lens.unique().tolist() == [24]  # num_kept(97, 0.75)


def test_bad_input_names_the_problem() -> None:
    m = tiny_model("llama")
    engine = Engine(m, PACKED)
    with pytest.raises(InvalidRequestError, match="fewer than the 20 that n_sink=4 and window=16 need"):
        engine.add_context(random_prompt(100, 1), make_press("demote", ratio=0.9))
    with pytest.raises(InvalidRequestError, match=r"unknown press 'nope'; known presses: .*demote"):
        press_from_spec("demote:nope", 0.5)
    with pytest.raises(InvalidRequestError, match="demote splits with a score press"):
        make_press("demote", press=make_press("adakv", press=make_press("knorm")))
    with pytest.raises(InvalidRequestError, match=r"compression ratio must be in \[0, 1\)"):
        make_press("demote", ratio=1.0)
    with pytest.raises(InvalidRequestError, match="window must be an integer >= 0"):
        make_press("demote", window=-1)
    assert engine.pool.num_used_blocks == 0  # nothing half cached


def test_spec_takes_the_wrapped_press_ratio() -> None:
    press = press_from_spec("demote:snapkv", 0.75)
    assert isinstance(press, DemotePress) and press.ratio == 0.75 and press.budget_fraction == 0.25


def test_demote_layer_refuses_a_plain_pool() -> None:
    m = tiny_model("llama")
    engine = Engine(m, CacheConfig(block_size=8))
    kv = engine.cache.new_sequence()
    engine.runner.forward([StepInput(kv, random_prompt(20, 1), 0)])
    with pytest.raises(InvalidRequestError, match="needs a packed cache"):
        demote_layer(engine.cache, kv, 0, torch.zeros(m.num_kv_heads, 20), 0.5, 4)
    assert int(kv.lens.min()) == 20  # unchanged


def test_eval_runs_demote_presses_on_every_kivi_width() -> None:
    from kvengine.eval.runner import EvalConfig

    cfg = EvalConfig(
        tasks=("niah_single",), presses=("none", "snapkv", "demote:snapkv"), ratios=(0.75,), kivi=(2, 3)
    )
    assert cfg.settings() == [
        ("none", 0.0, 0),
        ("snapkv", 0.75, 0),
        ("none", 0.0, 2),
        ("demote:snapkv", 0.75, 2),
        ("none", 0.0, 3),
        ("demote:snapkv", 0.75, 3),
    ]
    assert cfg.baseline_settings() == []
    with pytest.raises(InvalidRequestError, match="demote keeps demoted tokens packed: give KIVI bit widths"):
        EvalConfig(tasks=("niah_single",), presses=("demote",))
    with pytest.raises(InvalidRequestError, match=r"KIVI bit widths are 2, 3, 4 or 8, got \(5,\)"):
        EvalConfig(tasks=("niah_single",), kivi=(5,))
    with pytest.raises(InvalidRequestError, match="kv_key_groups must be 'channel' or 'token'"):
        EvalConfig(tasks=("niah_single",), kivi=(2,), kv_key_groups="rows")
