"""Presses inside the engine: exact references, memory really freed, shared contexts."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import hf_greedy, use_sdpa
from test_engine import random_prompt
from test_press_contract import layer_budget

from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.models import LoadedModel
from kvengine.press import PRESSES, Press, PressInput, make_press
from kvengine.press.none import NoPress

CACHE = CacheConfig(block_size=8, max_kv_bytes=32 * 2**20)


def build_press(name: str, ratio: float) -> Press:
    """A registered press at `ratio`, wrappers around a simple score press."""
    if name == "none":
        return NoPress()
    if name in ("adakv",):
        return make_press(name, press=make_press("knorm", ratio=ratio))
    if name == "per_layer":
        return make_press(name, press=make_press("knorm", ratio=ratio), ratios=(ratio,) * 3)
    return make_press(name, ratio=ratio)


@dataclass
class KeepFirst(Press):
    """Test press: every head keeps the first `n` tokens."""

    n: int
    ratio: float = 0.0

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        return [torch.arange(self.n)] * inp.num_kv_heads


@dataclass
class Spy(Press):
    """Test press: records what it was shown, keeps everything."""

    seen: list
    ratio: float = 0.0

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        self.seen.append((inp.layer, inp.num_tokens, inp.queries.shape[1], inp.positions))
        return [torch.arange(inp.num_tokens)] * inp.num_kv_heads


def run(engine: Engine) -> None:
    while engine.has_unfinished():
        engine.step()


def test_none_press_gives_identical_tokens(tiny: LoadedModel) -> None:
    prompts = [random_prompt(n, i) for i, n in enumerate([9, 40, 77])]
    engine = Engine(tiny, CACHE)
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    ids = [engine.add_request(p, params, press=NoPress()) for p in prompts]
    run(engine)
    for seq_id, p in zip(ids, prompts, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(tiny, p, 12)
    assert engine.pool.num_used_blocks == 0


def test_decoding_after_eviction_matches_hf_on_the_kept_tokens(tiny_llama: LoadedModel) -> None:
    """Keeping the first n of T tokens = the model on those n tokens, next token at position T."""
    prompt, n = random_prompt(50, 3), 21
    engine = Engine(tiny_llama, CACHE)
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=6, ignore_eos=True), press=KeepFirst(n))
    run(engine)
    out = engine.sequences[seq_id].output_ids
    # Reference: the first output token comes from the full prompt (compression is after it).
    tokens = [*prompt[:n]]
    positions = list(range(n))
    expected = [hf_greedy(tiny_llama, prompt, 1)[0]]
    for step in range(5):
        tokens.append(expected[-1])
        positions.append(len(prompt) + step)
        with use_sdpa(tiny_llama) as hf, torch.inference_mode():
            # An explicit mask: without one, transformers reads the position jump as a packed-sequence boundary.
            logits = hf(
                torch.tensor([tokens]),
                position_ids=torch.tensor([positions]),
                attention_mask=torch.ones(1, len(tokens), dtype=torch.long),
                use_cache=False,
            ).logits
        expected.append(int(logits[0, -1].argmax()))
    assert out == expected


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
@pytest.mark.parametrize("name", sorted(PRESSES))
def test_every_press_frees_what_its_ratio_says(tiny_llama: LoadedModel, name: str, ratio: float) -> None:
    """Each layer keeps exactly its budget (a head-wise press: over its heads), and the pool holds
    exactly the blocks of what is kept: nothing more, nothing less."""
    if name == "none" and ratio != 0.5:
        pytest.skip("'none' has ratio 0 only: checked once")
    m = tiny_llama
    prompt = random_prompt(203, 5)
    engine = Engine(m, CACHE)
    press = build_press(name, ratio)
    ctx = engine.add_context(prompt, press)
    run(engine)
    kv = engine.sequences[ctx].kv
    assert kv is not None
    budgets = [layer_budget(press, len(prompt), layer, m.num_layers) for layer in range(m.num_layers)]
    assert kv.lens.sum(1).tolist() == [m.num_kv_heads * b for b in budgets]
    blocks = int((-(-kv.lens // CACHE.block_size)).sum())
    assert engine.pool.bytes_in_use == engine.cache.bytes_held(kv) == blocks * engine.pool.bytes_per_block
    engine.release(ctx)
    assert engine.pool.num_used_blocks == 0


def test_press_sees_only_the_context_not_the_question(tiny_llama: LoadedModel) -> None:
    seen: list = []
    context, question = random_prompt(30, 1), random_prompt(7, 2)
    engine = Engine(tiny_llama, CACHE)
    engine.add_request(context + question, SamplingParams(max_tokens=2), press=Spy(seen), context_len=30)
    run(engine)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(tokens == 30 and queries == 30 for _, tokens, queries, _ in seen)
    assert seen[0][3].tolist() == list(range(30))


def test_questions_share_one_compressed_context(tiny: LoadedModel) -> None:
    context = random_prompt(60, 7)
    questions = [random_prompt(5, 8), random_prompt(9, 9), random_prompt(1, 10)]
    press = make_press("knorm", ratio=0.5)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    # Reference: each question with its own copy of the same compression.
    alone = Engine(tiny, CACHE)
    ref = [alone.add_request(context + q, params, press=press, context_len=60) for q in questions]
    run(alone)
    shared = Engine(tiny, CACHE)
    ctx = shared.add_context(context, press)
    ids = [shared.add_request(q, params, parent=ctx) for q in questions]
    run(shared)
    for a, b in zip(ref, ids, strict=True):
        assert shared.sequences[b].output_ids == alone.sequences[a].output_ids
    assert shared.pool.num_used_blocks > 0  # the context is still held
    shared.release(ctx)
    assert shared.pool.num_used_blocks == 0
    shared.pool.check_invariants()


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_kivi_cache_holds_packed_bytes_and_stays_close(tiny_llama: LoadedModel, bits: int) -> None:
    """KIVI blocks through the engine: exact byte count, logits near the float cache."""
    from kvengine.engine.runner import StepInput

    m = tiny_llama
    prompt = random_prompt(101, 4)
    float_engine = Engine(m, CACHE)
    kivi = Engine(m, CacheConfig(block_size=8, max_kv_bytes=8 * 2**20, kv_bits=bits))
    logits = {}
    for name, engine in [("float", float_engine), ("kivi", kivi)]:
        kv = engine.cache.new_sequence()
        engine.runner.forward([StepInput(kv, prompt, 0)])
        logits[name] = engine.runner.forward([StepInput(kv, [7], len(prompt))])[0]
        if name == "kivi":
            pool = engine.pool
            cells = m.num_layers * m.num_kv_heads
            # 102 tokens: 12 full blocks per cell sealed, the last 6 tokens still open.
            assert pool.num_used_packed_blocks == cells * 12 and pool.num_used_open_blocks == cells
            expected = cells * (12 * pool.packed_bytes_per_block + pool.open_bytes_per_block)
            assert engine.cache.bytes_held(kv) == pool.bytes_in_use == expected
        engine.cache.free(kv)
        assert engine.pool.num_used_blocks == 0
    error = float((logits["kivi"] - logits["float"]).abs().max() / logits["float"].abs().max())
    assert error < {2: 0.15, 4: 0.03, 8: 0.002}[bits], f"relative logit error {error:.4f}"


def test_press_then_kivi_quantizes_only_what_stays(tiny_llama: LoadedModel) -> None:
    engine = Engine(tiny_llama, CacheConfig(block_size=8, max_kv_bytes=8 * 2**20, kv_bits=2))
    ctx = engine.add_context(random_prompt(160, 2), make_press("knorm", ratio=0.5))
    run(engine)
    kv = engine.sequences[ctx].kv
    assert kv is not None and int(kv.lens.max()) == 80
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    assert engine.pool.num_used_packed_blocks == cells * 10 and engine.pool.num_used_open_blocks == 0
    engine.release(ctx)
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_compressing_a_kept_context_equals_compressing_inline(tiny_llama: LoadedModel, name: str) -> None:
    """One prefill, many presses (what evaluation does) = a prefill per press."""
    context, question = random_prompt(90, 11), random_prompt(6, 12)
    press = build_press(name, 0.0 if name == "none" else 0.5)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    inline = Engine(tiny_llama, CACHE)
    inline_ctx = inline.add_context(context, press)
    a = inline.add_request(question, params, parent=inline_ctx)
    run(inline)
    kept = Engine(tiny_llama, CACHE)
    base = kept.add_context(context, keep_queries=True)
    run(kept)
    copy = kept.compress_context(base, press)
    b = kept.add_request(question, params, parent=copy)
    run(kept)
    assert kept.sequences[b].output_ids == inline.sequences[a].output_ids
    copy_kv, inline_kv = kept.sequences[copy].kv, inline.sequences[inline_ctx].kv
    assert copy_kv is not None and inline_kv is not None
    assert torch.equal(copy_kv.lens, inline_kv.lens)
    assert kept.cache.bytes_held(copy_kv) == inline.cache.bytes_held(inline_kv)
    kept.release(copy)
    kept.release(base)
    assert kept.pool.num_used_blocks == 0


def test_streaming_llm_while_decoding_matches_a_masked_hf_forward(tiny_llama: LoadedModel) -> None:
    """Budget 20 (4 sinks + 16 recent), cut back when a head passes 20 + one 8-token block.

    Reference: one transformers forward over prompt and outputs with a 4-D mask:
    prompt tokens see the whole prompt causally (they were cached before any
    eviction); each generated token sees exactly what the rule left in the cache.
    """
    budget, block, n_sink = 20, 8, 4
    prompt = random_prompt(40, 21)
    engine = Engine(tiny_llama, CACHE)
    seq_id = engine.add_request(
        prompt,
        SamplingParams(max_tokens=30, ignore_eos=True),
        decode_press=make_press("streaming_llm", ratio=0.0, n_sink=n_sink),
        decode_budget=budget,
    )
    run(engine)
    tokens = list(prompt)
    cached = list(range(len(prompt)))  # indices into `tokens` held in the cache
    total = len(prompt) + 30
    mask = torch.ones(total, total, dtype=torch.bool).tril()
    expected = [hf_greedy(tiny_llama, prompt, 1)[0]]
    for _ in range(29):
        if len(cached) > budget + block:
            cached = cached[:n_sink] + cached[-(budget - n_sink) :]
        tokens.append(expected[-1])
        cached.append(len(tokens) - 1)
        row = torch.zeros(total, dtype=torch.bool)
        row[cached] = True
        mask[len(tokens) - 1] = row
        n = len(tokens)
        with use_sdpa(tiny_llama) as hf, torch.inference_mode():
            logits = hf(
                torch.tensor([tokens]), attention_mask=mask[None, None, :n, :n], use_cache=False
            ).logits
        expected.append(int(logits[0, -1].argmax()))
    assert engine.sequences[seq_id].output_ids == expected
    assert engine.num_decode_compressions >= 3
    assert engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "tova", "snapkv", "knorm"])
def test_decoding_time_presses_keep_memory_bounded(tiny_llama: LoadedModel, name: str) -> None:
    budget = 80
    engine = Engine(tiny_llama, CACHE)
    seq_id = engine.add_request(
        random_prompt(30, 3),
        SamplingParams(max_tokens=150, ignore_eos=True),
        decode_press=build_press(name, 0.0),
        decode_budget=budget,
    )
    peak_tokens = 0
    while engine.has_unfinished():
        engine.step()
        kv = engine.sequences[seq_id].kv
        if kv is not None and not engine.sequences[seq_id].is_finished:
            peak_tokens = max(peak_tokens, kv.max_len)
    assert len(engine.sequences[seq_id].output_ids) == 150
    assert peak_tokens <= budget + CACHE.block_size + 1
    assert engine.num_decode_compressions >= 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"decode_budget": 10}, "decode_press and decode_budget go together"),
        ({"decode_press": make_press("knorm"), "decode_budget": 0}, "positive integer"),
        ({"decode_press": make_press("streaming_llm", n_sink=4), "decode_budget": 4}, "sink/window"),
        ({"decode_press": make_press("snapkv", window_size=64), "decode_budget": 50}, "sink/window"),
        (  # a wrapper keeps what its inner press always keeps
            {
                "decode_press": make_press("adakv", press=make_press("snapkv", window_size=64)),
                "decode_budget": 50,
            },
            "sink/window",
        ),
        ({"decode_press": make_press("none"), "decode_budget": 50}, "ratio must be 0"),
    ],
)
def test_bad_decoding_compression_is_rejected(tiny_llama: LoadedModel, kwargs: dict, message: str) -> None:
    from kvengine.errors import InvalidRequestError

    engine = Engine(tiny_llama, CACHE)
    with pytest.raises(InvalidRequestError, match=message):
        engine.add_request([1, 2, 3], **kwargs)


@pytest.mark.parametrize("name", sorted(PRESSES))
def test_every_press_at_ratio_0_gives_uncompressed_tokens(tiny_llama: LoadedModel, name: str) -> None:
    prompts = [random_prompt(n, 30 + n) for n in (12, 70)]
    engine = Engine(tiny_llama, CACHE)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = [engine.add_request(p, params, press=build_press(name, 0.0)) for p in prompts]
    run(engine)
    for seq_id, p in zip(ids, prompts, strict=True):
        assert engine.sequences[seq_id].output_ids == hf_greedy(tiny_llama, p, 8)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_batched_decode_equals_one_at_a_time(family: str) -> None:
    """Decode attention of many sequences in one call (padded, masked per head) = one by one.

    AdaKV leaves heads with different lengths; Mistral adds a sliding window.
    """
    from conftest import tiny_model

    from kvengine.config import SchedulerConfig

    model = tiny_model(family)
    prompts = [random_prompt(n, 40 + n) for n in (20, 57, 90, 33)]
    press = make_press("adakv", press=make_press("knorm", ratio=0.5))
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    outputs = []
    for max_num_seqs in (1, 4):
        engine = Engine(model, CACHE, SchedulerConfig(max_num_seqs=max_num_seqs))
        ids = [engine.add_request(p, params, press=press) for p in prompts]
        run(engine)
        outputs.append([engine.sequences[i].output_ids for i in ids])
        assert engine.pool.num_used_blocks == 0
    assert outputs[0] == outputs[1]


@dataclass
class Refuses(Press):
    """Test press: refuses at keep() time what validate() let through."""

    ratio: float = 0.5

    def keep(self, inp: PressInput) -> list[torch.Tensor]:
        from kvengine.errors import InvalidRequestError

        raise InvalidRequestError("refused")


def test_press_that_cannot_fit_is_rejected_when_added(tiny_llama: LoadedModel) -> None:
    from kvengine.errors import InvalidRequestError

    engine = Engine(tiny_llama, CACHE)
    press = make_press("streaming_llm", ratio=0.5, n_sink=4)
    with pytest.raises(InvalidRequestError, match="4 sink tokens do not fit in the budget of 2 tokens"):
        engine.add_request([5, 6, 7, 8, 9], press=press)
    with pytest.raises(InvalidRequestError, match="2 ratios given but the model has 3 layers"):
        engine.add_context(
            random_prompt(20, 1), make_press("per_layer", press=make_press("knorm"), ratios=(0.5, 0.5))
        )
    assert not engine.has_unfinished()


def test_a_press_failing_mid_step_ends_that_step_only(tiny_llama: LoadedModel) -> None:
    """The engine ends the step's requests with an error, frees them, and keeps serving."""
    engine = Engine(tiny_llama, CACHE)
    bad = engine.add_request(random_prompt(20, 1), press=Refuses())
    assert engine.step() == []
    assert set(engine.step_errors) == {bad} and engine.sequences[bad].finish_reason == "error"
    assert engine.pool.num_used_blocks == 0
    good = engine.add_request(random_prompt(20, 2), SamplingParams(max_tokens=4, ignore_eos=True))
    run(engine)
    assert engine.sequences[good].output_ids == hf_greedy(tiny_llama, random_prompt(20, 2), 4)


def test_async_engine_survives_a_failing_request(tiny_llama: LoadedModel) -> None:
    import asyncio

    from kvengine.engine.async_engine import AsyncEngine
    from kvengine.errors import InvalidRequestError

    engine = Engine(tiny_llama, CACHE)

    async def main_() -> list[int]:
        async with AsyncEngine(engine) as llm:
            with pytest.raises(InvalidRequestError, match="refused"):
                async for _ in llm.generate(
                    random_prompt(20, 1), SamplingParams(max_tokens=3), press=Refuses()
                ):
                    pass
            params = SamplingParams(max_tokens=3, ignore_eos=True)
            return [e.token_id async for e in llm.generate(random_prompt(9, 2), params)]

    assert len(asyncio.run(main_())) == 3
    assert engine.pool.num_used_blocks == 0
