"""The engine on tiny random models against transformers: logits and greedy tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_greedy, hf_logits, tiny_model

from kvengine.cache.paged import PagedKVCache
from kvengine.cache.pool import BlockPool
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.runner import ModelRunner, StepInput
from kvengine.models import LoadedModel


def random_prompt(length: int, seed: int, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


def runner_for(model: LoadedModel, block_size: int = 4) -> ModelRunner:
    pool = BlockPool(4096, block_size, model.head_dim, device=model.device)
    return ModelRunner(model, PagedKVCache(pool, model.num_layers, model.num_kv_heads))


def test_packed_prefill_chunks_and_decode_match_full_forward(tiny: LoadedModel) -> None:
    """Three sequences share forward passes: a chunked prefill, a fresh one, decodes."""
    runner = runner_for(tiny)
    a, b, c = random_prompt(37, 1), random_prompt(11, 2), random_prompt(50, 3)
    kv_a, kv_b, kv_c = (runner.cache.new_sequence() for _ in range(3))
    # Step 1: all of b, first 20 tokens of a, first 30 of c.
    logits = runner.forward([StepInput(kv_b, b, 0), StepInput(kv_a, a[:20], 0), StepInput(kv_c, c[:30], 0)])
    torch.testing.assert_close(logits[0], hf_logits(tiny, b)[-1], atol=1e-4, rtol=1e-4)
    # Step 2: rest of a, one decode token of b, rest of c.
    logits = runner.forward(
        [StepInput(kv_a, a[20:], 20), StepInput(kv_b, [7], 11), StepInput(kv_c, c[30:], 30)]
    )
    torch.testing.assert_close(logits[0], hf_logits(tiny, a)[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[1], hf_logits(tiny, [*b, 7])[-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits[2], hf_logits(tiny, c)[-1], atol=1e-4, rtol=1e-4)


def test_decode_logits_match_at_every_step(tiny_llama: LoadedModel) -> None:
    runner = runner_for(tiny_llama, block_size=3)
    tokens = random_prompt(9, 4)
    kv = runner.cache.new_sequence()
    logits = runner.forward([StepInput(kv, tokens, 0)])[0]
    for _ in range(12):
        nxt = int(logits.argmax())
        tokens.append(nxt)
        logits = runner.forward([StepInput(kv, [nxt], len(tokens) - 1)])[0]
        torch.testing.assert_close(logits, hf_logits(tiny_llama, tokens)[-1], atol=1e-4, rtol=1e-4)


def test_greedy_engine_matches_hf_generate(tiny: LoadedModel, no_leaks: list) -> None:
    lengths = [1, 2, 5, 16, 17, 33, 64, 100, 257, 400]
    prompts = [random_prompt(n, 10 + i) for i, n in enumerate(lengths)]
    engine = Engine(
        tiny, CacheConfig(block_size=16, max_kv_bytes=64 * 2**20), SchedulerConfig(max_step_tokens=256)
    )
    no_leaks.append(engine)
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    while engine.has_unfinished():
        engine.step()
    for seq_id, prompt in zip(ids, prompts, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(tiny, prompt, 24), f"prompt len {len(prompt)}"


def test_sliding_window_model_beyond_its_window() -> None:
    """Mistral with a 24-token window, prompts longer than the window."""
    model = tiny_model("mistral")
    prompt = random_prompt(70, 5)
    engine = Engine(model, CacheConfig(block_size=8, max_kv_bytes=8 * 2**20))
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=10, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    assert engine.sequences[seq_id].output_ids == hf_greedy(model, prompt, 10)


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 100])
def test_pool_bytes_follow_the_formula_and_return(tiny_llama: LoadedModel, tokens: int) -> None:
    block = 16
    engine = Engine(tiny_llama, CacheConfig(block_size=block, max_kv_bytes=16 * 2**20))
    seq_id = engine.add_request(random_prompt(tokens, 0), SamplingParams(max_tokens=1))
    engine.step()  # prefill + the one token: finished and freed
    seq = engine.sequences[seq_id]
    m = tiny_llama
    expected = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4 * -(-tokens // block) * block
    assert seq.kv_bytes == expected
    assert engine.peak_bytes_in_use == expected
    assert engine.pool.num_used_blocks == 0
    engine.pool.check_invariants()


def test_abort_frees_blocks_at_once(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CacheConfig(max_kv_bytes=8 * 2**20))
    seq_id = engine.add_request(random_prompt(40, 0), SamplingParams(max_tokens=50))
    engine.step()
    assert engine.pool.num_used_blocks > 0
    engine.abort(seq_id)
    assert engine.pool.num_used_blocks == 0
    assert engine.sequences[seq_id].finish_reason == "abort"
    assert not engine.has_unfinished()


def test_requests_wait_when_the_pool_is_full(tiny_llama: LoadedModel, no_leaks: list) -> None:
    """A pool for about two requests serves six, in waves, with the same tokens as alone."""
    m = tiny_llama
    per_token = 2 * m.num_layers * m.num_kv_heads * m.head_dim * 4
    engine = Engine(m, CacheConfig(block_size=8, max_kv_bytes=per_token * 8 * 2 * 6))
    no_leaks.append(engine)
    prompts = [random_prompt(30, 20 + i) for i in range(6)]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    max_running = 0
    while engine.has_unfinished():
        engine.step()
        max_running = max(max_running, len(engine.scheduler.running))
    assert max_running == 2
    for seq_id, prompt in zip(ids, prompts, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(m, prompt, 12)


def test_32_concurrent_requests_match_hf_generate_alone(tiny_llama: LoadedModel, no_leaks: list) -> None:
    """32 requests of mixed lengths and output budgets share every step; each equals generate alone."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 300, (32,), generator=g).tolist()
    budgets = torch.randint(8, 20, (32,), generator=g).tolist()
    prompts = [random_prompt(n, 100 + i) for i, n in enumerate(lengths)]
    engine = Engine(tiny_llama, CacheConfig(max_kv_bytes=64 * 2**20), SchedulerConfig(max_step_tokens=8192))
    no_leaks.append(engine)
    ids = [
        engine.add_request(p, SamplingParams(max_tokens=b, ignore_eos=True))
        for p, b in zip(prompts, budgets, strict=True)
    ]
    max_running = 0
    while engine.has_unfinished():
        engine.step()
        max_running = max(max_running, len(engine.scheduler.running))
    assert max_running == 32
    for seq_id, prompt, budget in zip(ids, prompts, budgets, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(tiny_llama, prompt, budget)
