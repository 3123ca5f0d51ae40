"""The prefix cache inside the engine: same tokens as without it, exact reuse, exact ownership.

References: transformers' `generate` on each prompt alone, the engine with the
prefix cache off, and a brute-force longest-prefix search over what was
inserted and not evicted. After every test, every block is free or held by
the tree alone (`cached_or_free`), and block ownership is checked after
every step where it matters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest
import torch
from conftest import hf_greedy, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from test_engine import random_prompt

from kvengine.cache.radix import RadixNode
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.engine.scheduler import MAX_SKIPS
from kvengine.models import LoadedModel
from kvengine.press.none import NoPress

BLOCK = 4
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def prefix_engine(model: LoadedModel, num_blocks: int = 4096, **kwargs: object) -> Engine:
    """An engine with the prefix cache on and a pool of `num_blocks` blocks of BLOCK tokens."""
    per_block = 2 * BLOCK * model.head_dim * 4
    cache = CacheConfig(block_size=BLOCK, max_kv_bytes=num_blocks * per_block, prefix_cache=True, **kwargs)  # type: ignore[arg-type]
    return Engine(model, cache, SchedulerConfig(max_step_tokens=128))


def run_checked(engine: Engine) -> None:
    """Step to the end, checking block ownership after every step."""
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()


def cached_prefix_len(a: list[int], b: list[int], block: int = BLOCK) -> int:
    """Tokens of the longest whole-block common prefix of `a` and `b`."""
    n = 0
    while n + block <= min(len(a), len(b)) and a[n : n + block] == b[n : n + block]:
        n += block
    return n


@pytest.fixture
def cached_or_free() -> Iterator[list[Engine]]:
    """Engines a test creates: afterwards every block is free or held by the prefix cache alone.

    (That is: by the radix tree, or by the compressed contexts it keeps.)
    """
    engines: list[Engine] = []
    yield engines
    for engine in engines:
        engine.check_invariants()
        assert not engine.has_unfinished()
        held = 0
        if engine.prefix is not None:  # the tree's blocks and kept compressed contexts'
            kept = [kv.block_table[kv.block_table >= 0] for kv in engine.prefix.compressed.holders()]
            held = engine.prefix.num_evictable_blocks + (torch.cat(kept).unique().numel() if kept else 0)
        assert engine.pool.num_used_blocks == held, "blocks leaked"
        assert engine.prefix is None or engine.prefix.tree.num_locked_blocks == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_shared_system_prompt_matches_hf_and_reuses_whole_blocks(family: str, cached_or_free: list) -> None:
    model = tiny_model(family)
    system = random_prompt(41, 1)
    prompts = [system + random_prompt(n, 10 + n) for n in (3, 9, 1, 14)]
    engine = prefix_engine(model)
    cached_or_free.append(engine)
    first = engine.generate([prompts[0]], PARAMS)[0]
    assert first.num_cached_tokens == 0
    inserted = prompts[0] + first.output_ids[:-1]  # every token whose KV was computed
    rest = engine.generate(prompts[1:], PARAMS)
    for out, prompt in zip(rest, prompts[1:], strict=True):
        assert out.num_cached_tokens == cached_prefix_len(prompt[:-1], inserted)
        assert out.num_cached_tokens >= 40
        assert out.output_ids == hf_greedy(model, prompt, PARAMS.max_tokens)
    assert first.output_ids == hf_greedy(model, prompts[0], PARAMS.max_tokens)


def test_multi_turn_reuses_the_first_turn_and_its_answer(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    engine = prefix_engine(tiny_llama)
    cached_or_free.append(engine)
    params = SamplingParams(max_tokens=9, ignore_eos=True)
    turn1 = random_prompt(30, 2)
    out1 = engine.generate([turn1], params)[0].output_ids
    turn2 = turn1 + out1 + random_prompt(7, 3)
    out2 = engine.generate([turn2], params)[0]
    computed = len(turn1) + len(out1) - 1  # the last output token was never fed back
    assert out2.num_cached_tokens == computed // BLOCK * BLOCK
    assert out2.output_ids == hf_greedy(tiny_llama, turn2, 9)
    turn3 = turn2 + out2.output_ids + random_prompt(5, 4)
    out3 = engine.generate([turn3], params)[0]
    assert out3.num_cached_tokens == (len(turn2) + 9 - 1) // BLOCK * BLOCK
    assert out3.output_ids == hf_greedy(tiny_llama, turn3, 9)


def test_outputs_equal_with_and_without_the_prefix_cache(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    """Many requests sharing a few prefixes, all in flight together (some hit what others leave)."""
    heads = [random_prompt(n, 40 + n) for n in (17, 33, 8)]
    prompts = [heads[i % 3] + random_prompt(1 + i % 5, 60 + i) for i in range(15)]
    params = SamplingParams(max_tokens=7, ignore_eos=True)
    off = Engine(tiny_llama, CacheConfig(block_size=BLOCK, max_kv_bytes=16 * 2**20))
    expected = [o.output_ids for o in off.generate(prompts, params)]
    on = prefix_engine(tiny_llama)
    cached_or_free.append(on)
    got = []
    for wave in (prompts[:3], prompts[3:9], prompts[9:]):
        got += [o.output_ids for o in on.generate(wave, params)]
    assert got == expected
    assert on.prefix is not None and on.prefix.num_hit_tokens > 0


def test_tenants_and_presses_never_share(tiny_llama: LoadedModel, cached_or_free: list) -> None:
    engine = prefix_engine(tiny_llama)
    cached_or_free.append(engine)
    prompt = random_prompt(40, 5)
    engine.generate([prompt], PARAMS, cache_salt="tenant-a")
    assert engine.generate([prompt], PARAMS, cache_salt="tenant-b")[0].num_cached_tokens == 0
    assert engine.generate([prompt], PARAMS, cache_salt="tenant-a")[0].num_cached_tokens == 36
    assert engine.prefix is not None
    cached = engine.prefix.tree.num_cached_blocks
    seq_id = engine.add_request(prompt, PARAMS, press=NoPress(), cache_salt="tenant-a")
    run_checked(engine)
    assert engine.sequences[seq_id].num_cached_tokens == 0  # a press neither reuses ...
    assert engine.prefix.tree.num_cached_blocks == cached  # ... nor leaves blocks behind
    engine.release(seq_id)


def test_eviction_under_a_small_pool_keeps_outputs_exact(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    engine = prefix_engine(tiny_llama, num_blocks=cells * 40)  # 160 tokens per cell in all
    cached_or_free.append(engine)
    system = random_prompt(24, 6)
    prompts = [system + random_prompt(20, 70 + i) for i in range(10)]
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in prompts]
    run_checked(engine)
    for seq_id, prompt in zip(ids, prompts, strict=True):
        assert engine.release(seq_id).output_ids == hf_greedy(tiny_llama, prompt, 10)
    assert engine.prefix is not None and engine.prefix.num_evicted_blocks > 0
    assert engine.prefix.num_hit_tokens > 0


@pytest.mark.parametrize("policy", ["lru", "lfu", "gdsf", "predictive"])
def test_every_policy_serves_exact_outputs(
    tiny_llama: LoadedModel, policy: str, cached_or_free: list
) -> None:
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    engine = prefix_engine(tiny_llama, num_blocks=cells * 30, eviction_policy=policy)
    cached_or_free.append(engine)
    heads = [random_prompt(16, 80 + i) for i in range(3)]
    prompts = [heads[i % 3] + random_prompt(6, 90 + i) for i in range(6)]
    for prompt in prompts:  # one at a time: each finds what the ones before left
        assert engine.generate([prompt], PARAMS)[0].output_ids == hf_greedy(tiny_llama, prompt, 6)
        engine.check_invariants()


def test_abort_keeps_computed_blocks_and_frees_the_rest(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    engine = prefix_engine(tiny_llama)
    cached_or_free.append(engine)
    prompt = random_prompt(22, 7)
    seq_id = engine.add_request(prompt, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(4):
        engine.step()
    engine.abort(seq_id)
    seq = engine.release(seq_id)
    engine.check_invariants()
    assert engine.prefix is not None
    cells = tiny_llama.num_layers * tiny_llama.num_kv_heads
    assert engine.prefix.tree.num_cached_blocks == (22 + 3) // BLOCK  # 3 outputs fed back
    assert engine.pool.num_used_blocks == engine.prefix.tree.num_cached_blocks * cells
    again = engine.generate([prompt + seq.output_ids], PARAMS)[0]
    assert again.num_cached_tokens == (22 + 3) // BLOCK * BLOCK


def test_longest_match_goes_first_but_the_oldest_waits_at_most_max_skips(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    per_block = 2 * BLOCK * tiny_llama.head_dim * 4
    cache = CacheConfig(block_size=BLOCK, max_kv_bytes=4096 * per_block, prefix_cache=True)
    engine = Engine(tiny_llama, cache, SchedulerConfig(max_num_seqs=1))
    cached_or_free.append(engine)
    shared = random_prompt(32, 8)
    engine.generate([shared], PARAMS)
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    cold = engine.add_request(random_prompt(20, 9), params)
    warm = [engine.add_request(shared + random_prompt(3, 10 + i), params) for i in range(MAX_SKIPS + 3)]
    order: list[int] = []
    while engine.has_unfinished():
        engine.step()
        for seq in engine.scheduler.running:
            if seq.seq_id not in order:
                order.append(seq.seq_id)
    assert order == [*warm[:MAX_SKIPS], cold, *warm[MAX_SKIPS:]]


# ---- random request mixes against a brute-force prefix store ------------------------------------


@functools.cache
def _model() -> LoadedModel:
    return tiny_model("llama")


@functools.cache
def _reference(prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    return hf_greedy(_model(), list(prompt), max_tokens)


class BruteForcePrefixes:
    """Every whole-block prefix inserted and not evicted since, per namespace, as plain sets."""

    def __init__(self, engine: Engine) -> None:
        assert engine.prefix is not None
        self.store: dict[object, set[tuple[int, ...]]] = {}
        self.inserted: set[tuple[object, tuple[int, ...]]] = set()
        self.num_matches = 0
        tree = engine.prefix.tree
        insert, match, on_evict = tree.insert, tree.match_prefix, tree.policy.on_evict

        def spy_insert(tokens: list[int], values: list, namespace: object = None) -> int:
            whole = tuple(tokens[: len(tokens) // BLOCK * BLOCK])
            self.inserted.add((namespace, whole))
            prefixes = self.store.setdefault(namespace, set())
            prefixes.update(whole[:n] for n in range(BLOCK, len(whole) + 1, BLOCK))
            return insert(tokens, values, namespace)

        def spy_match(tokens: list[int], namespace: object = None):  # type: ignore[no-untyped-def]
            result = match(tokens, namespace)
            prefixes = self.store.get(namespace, set())
            expected = max(
                (n for n in range(0, len(tokens) + 1, BLOCK) if tuple(tokens[:n]) in prefixes), default=0
            )
            assert result.num_tokens == expected, f"matched {result.num_tokens}, brute force {expected}"
            self.num_matches += 1
            return result

        def spy_evict(node: RadixNode, num_blocks: int) -> None:
            path: list[int] = []
            n: RadixNode | None = node
            while n is not None and n.parent is not None:
                path[:0] = n.key
                n = n.parent
            for k in range(num_blocks):
                self.store[node.namespace].discard(tuple(path[: len(path) - k * BLOCK]))
            on_evict(node, num_blocks)

        tree.insert, tree.match_prefix = spy_insert, spy_match  # type: ignore[method-assign,assignment]
        tree.policy.on_evict = spy_evict  # type: ignore[method-assign]


request_st = st.tuples(
    st.integers(0, 2),  # which shared head
    st.integers(1, 10),  # suffix length
    st.integers(1, 40),  # max_tokens
    st.sampled_from(["", "t"]),  # tenant salt
    st.integers(0, 6),  # steps to run before adding it
    st.one_of(st.none(), st.integers(1, 6)),  # abort after this many steps, or run to the end
)


@settings(max_examples=25, deadline=None)
@given(
    requests=st.lists(request_st, min_size=1, max_size=7),
    blocks_per_cell=st.integers(19, 40),
    seed=st.integers(0, 99),
)
def test_random_mixes_match_brute_force_and_hf(requests: list, blocks_per_cell: int, seed: int) -> None:
    model = _model()
    engine = prefix_engine(model, num_blocks=blocks_per_cell * model.num_layers * model.num_kv_heads)
    prefix = engine.prefix
    assert prefix is not None
    spy = BruteForcePrefixes(engine)
    heads = [random_prompt(n, 200 + n) for n in (0, 9, 26)]
    added: list[tuple[int, list[int], int, str, int | None]] = []
    for i, (head, suffix, max_tokens, salt, wait, abort_after) in enumerate(requests):
        for _ in range(wait):
            engine.step()
            engine.check_invariants()
        prompt = heads[head] + random_prompt(suffix, seed * 100 + i)
        seq_id = engine.add_request(
            prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), cache_salt=salt
        )
        added.append((seq_id, prompt, max_tokens, salt, abort_after))
    steps = 0
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
        steps += 1
        for seq_id, _, _, _, abort_after in added:
            if abort_after == steps:
                engine.abort(seq_id)
    for seq_id, prompt, max_tokens, _, _ in added:
        seq = engine.release(seq_id)
        assert seq.output_ids == _reference(tuple(prompt), max_tokens)[: len(seq.output_ids)]
        if seq.finish_reason == "abort":
            continue
        assert len(seq.output_ids) == max_tokens
        computed = (prompt + seq.output_ids)[:-1]
        if len(computed) >= BLOCK:  # what it leaves behind is exactly what it computed
            whole = tuple(computed[: len(computed) // BLOCK * BLOCK])
            namespace, _ = prefix.keys.tree_key(list(whole), seq.cache_salt)
            assert (namespace, whole) in spy.inserted
    assert spy.num_matches >= len(requests)
    engine.check_invariants()
    assert engine.pool.num_used_blocks == prefix.num_evictable_blocks
    assert torch.equal(prefix.cached_block_ids().sort().values, engine.pool.ref_counts.nonzero().flatten())


def test_a_prompt_is_shared_as_soon_as_its_prefill_is_done(
    tiny_llama: LoadedModel, cached_or_free: list
) -> None:
    engine = prefix_engine(tiny_llama)
    cached_or_free.append(engine)
    shared = random_prompt(40, 31)
    first, second = shared + random_prompt(3, 32), shared + random_prompt(5, 33)
    long = SamplingParams(max_tokens=12, ignore_eos=True)
    a = engine.add_request(first, long)
    while engine.sequences[a].is_prefilling:
        engine.step()
        engine.check_invariants()
    b = engine.add_request(second, PARAMS)  # `first` is still decoding
    run_checked(engine)
    out_a, out_b = engine.release(a), engine.release(b)
    assert out_b.num_cached_tokens == 40
    assert out_a.output_ids == hf_greedy(tiny_llama, first, 12)
    assert out_b.output_ids == hf_greedy(tiny_llama, second, PARAMS.max_tokens)
