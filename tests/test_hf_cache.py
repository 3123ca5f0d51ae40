"""`KVEngineCache` inside transformers' own `generate`, against plain `generate` and kvengine's engine.

References: without a press (or at ratio 0) the tokens equal transformers'
`generate` with its dynamic cache, token for token, for every family the
tests build (Mistral's sliding window included); with a press, every
(layer, kv-head) keeps exactly the token positions kvengine's engine keeps for
the same press and prompt, the decoded tokens are the engine's, and the pool
holds the bytes the kept tokens need, measured against transformers' own
cache. The model's attention implementation comes back after the block,
also when it raises; bad input is refused with a message naming it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
import transformers
from conftest import FAMILIES, tiny_model

from kvengine.compat import KVEngineCache, SnapKVPress
from kvengine.config import CacheConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError, OutOfBlocksError, UnsupportedModelError
from kvengine.models import LoadedModel
from kvengine.press import PRESSES, Press, make_press
from kvengine.press.adakv import AdaKV
from kvengine.press.per_layer import PerLayerPress

PROMPT_LEN = 100
NEW_TOKENS = 8


def prompt(n: int = PROMPT_LEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def plain_generate(hf: transformers.PreTrainedModel, ids: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    return hf.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1] :].tolist()


def cache_generate(cache: KVEngineCache, ids: torch.Tensor, n: int = NEW_TOKENS) -> list[int]:
    hf = cache.model.hf_model
    return hf.generate(ids, max_new_tokens=n, do_sample=False, past_key_values=cache)[
        0, ids.shape[1] :
    ].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_press_equals_plain_generate(family: str) -> None:
    hf = tiny_model(family).hf_model
    ids = prompt(40)  # Mistral's window is 24: prefill and decode both cross it
    expected = plain_generate(hf, ids, 16)
    with KVEngineCache(hf) as cache:
        assert cache_generate(cache, ids, 16) == expected
    with KVEngineCache(hf, press=SnapKVPress(compression_ratio=0.0, window_size=8)) as cache:
        assert cache_generate(cache, ids, 16) == expected
        assert cache.compression is not None and cache.compression[0] == cache.compression[1]


def press_cases() -> list[str]:
    """Every registered press with a ratio (a new one is tested once registered), and the wrappers."""
    names = [
        n
        for n in PRESSES
        if n != "none" and "ratio" in {f.name for f in dataclasses.fields(PRESSES.lookup(n))}
    ]
    return [*names, "adakv:snapkv", "per_layer:snapkv"]


def build(case: str, num_layers: int) -> Press:
    *wrapper, name = case.split(":")
    if wrapper == ["adakv"]:
        return AdaKV(make_press(name, ratio=0.5))  # type: ignore[arg-type]
    if wrapper == ["per_layer"]:
        ratios = [0.25 + 0.5 * layer / max(1, num_layers - 1) for layer in range(num_layers)]
        return PerLayerPress(make_press(name), ratios)  # type: ignore[arg-type]
    return make_press(name, ratio=0.5)


def engine_run(model: LoadedModel, ids: list[int], press: Press) -> tuple[list[list[list[int]]], list[int]]:
    """Positions each (layer, kv-head) keeps after the engine's prefill and press, and its tokens."""
    engine = Engine(model, CacheConfig(block_size=8, max_kv_bytes=16 * 2**20))
    rid = engine.add_request(ids, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), press=press)
    engine.step()  # prefill, press, first token
    kv = engine.sequences[rid].kv
    assert kv is not None
    kept = kept_positions(kv.token_positions, kv.lens, model, 0)
    while engine.has_unfinished():
        engine.step()
    return kept, engine.release(rid).output_ids


def kept_positions(
    positions_of: Callable[[int], torch.Tensor], lens: torch.Tensor, model: LoadedModel, appended: int
) -> list[list[list[int]]]:
    """Positions per (layer, kv-head), without the last `appended` tokens of each head."""
    return [
        [
            positions_of(layer)[head, : int(lens[layer, head]) - appended].tolist()
            for head in range(model.num_kv_heads)
        ]
        for layer in range(model.num_layers)
    ]


@pytest.mark.parametrize("case", press_cases())
def test_press_keeps_what_the_engine_keeps(case: str) -> None:
    model = tiny_model("llama")
    press = build(case, model.num_layers)
    ids = prompt()
    try:
        kept, tokens = engine_run(model, ids[0].tolist(), press)
    except InvalidRequestError as refused:  # a press the engine cannot run here: the cache refuses it too
        with (
            pytest.raises(InvalidRequestError, match=re.escape(str(refused))),
            KVEngineCache(model.hf_model, press) as c,
        ):
            cache_generate(c, ids)
        return
    with KVEngineCache(model.hf_model, press=press) as cache:
        got = cache_generate(cache, ids)
        # after the press, generate fed back NEW_TOKENS - 1 tokens; each head appended them
        assert kept_positions(cache.token_positions, cache.seq.lens, model, NEW_TOKENS - 1) == kept
        assert cache.compression is not None and cache.compression[1] < cache.compression[0]
    assert got == tokens


def test_kept_counts_match_the_engine_head_by_head() -> None:
    """AdaKV keeps different numbers per head: the counts, not only the prefixes, are the engine's."""
    model = tiny_model("llama")
    press = AdaKV(make_press("snapkv", ratio=0.5, window_size=8))  # type: ignore[arg-type]
    ids = prompt()
    engine = Engine(model, CacheConfig(block_size=8, max_kv_bytes=16 * 2**20))
    rid = engine.add_request(ids[0].tolist(), SamplingParams(max_tokens=2, ignore_eos=True), press=press)
    engine.step()
    kv = engine.sequences[rid].kv
    assert kv is not None
    engine_lens = kv.lens.clone()
    while engine.has_unfinished():
        engine.step()
    engine.release(rid)
    with KVEngineCache(model.hf_model, press=press) as cache:
        cache_generate(cache, ids, 1)  # the prefill only: nothing appended after the press
        assert torch.equal(cache.seq.lens, engine_lens)
        assert not bool((cache.seq.lens == cache.seq.lens[0, 0]).all())  # heads really differ


def test_the_cache_holds_the_bytes_it_keeps() -> None:
    """Bytes held, measured in the pool, against transformers' own dynamic cache of the same prompt."""
    hf = tiny_model("llama").hf_model
    ids = prompt(64)
    out = hf.generate(ids, max_new_tokens=1, do_sample=False, return_dict_in_generate=True)
    dynamic = out.past_key_values
    dynamic_bytes = sum(
        layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
        for layer in dynamic.layers
    )
    with KVEngineCache(hf, press=SnapKVPress(compression_ratio=0.5, window_size=8), block_size=16) as cache:
        cache_generate(cache, ids, 1)  # prefill and press; 64 tokens are 4 full blocks per cell
        assert cache.compression == (dynamic_bytes, dynamic_bytes // 2)
        assert cache.bytes_held == cache.pool.bytes_in_use == dynamic_bytes // 2
        assert cache.bytes_full == dynamic_bytes
        cache.pool.check_invariants()
    assert cache.pool.bytes_in_use == 0  # every block back in the pool after the block


def test_attention_implementation_is_restored() -> None:
    hf = tiny_model("llama").hf_model
    hf.set_attn_implementation("eager")
    cache = KVEngineCache(hf, press=SnapKVPress(compression_ratio=0.5, window_size=8))
    with pytest.raises(ValueError, match="boom"), cache:
        assert hf.config._attn_implementation == "kvengine_cache"
        cache_generate(cache, prompt(), 2)
        assert cache.pool.bytes_in_use > 0
        raise ValueError("boom")
    assert hf.config._attn_implementation == "eager"
    assert cache.pool.bytes_in_use == 0
    with pytest.raises(InvalidRequestError, match="batch of 2"), cache:
        hf.generate(prompt().repeat(2, 1), max_new_tokens=2, do_sample=False, past_key_values=cache)
    assert hf.config._attn_implementation == "eager"
    assert cache.pool.bytes_in_use == 0
    with cache:  # reusable after an error: the same tokens as a fresh cache
        first = cache_generate(cache, prompt())
    with KVEngineCache(hf, press=SnapKVPress(compression_ratio=0.5, window_size=8)) as fresh:
        assert cache_generate(fresh, prompt()) == first
    assert hf.config._attn_implementation == "eager"


def test_user_generate_works_after_an_engine_ran_on_the_model() -> None:
    model = tiny_model("llama")
    hf = model.hf_model
    ids = prompt(20)
    before = plain_generate(hf, ids)
    engine = Engine(model, CacheConfig(block_size=8, max_kv_bytes=16 * 2**20))
    [out] = engine.generate([ids[0].tolist()], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert out.output_ids == before
    assert hf.config._attn_implementation == "kvengine"
    assert plain_generate(hf, ids) == before  # the user's own generate, with the model's own attention
    assert hf.config._attn_implementation == "kvengine"  # and the engine's is back for the engine
    with pytest.raises(IndexError):
        hf(torch.tensor([[10_000]]))  # a forward that raises also gives the engine its attention back
    assert hf.config._attn_implementation == "kvengine"
    [again] = engine.generate([ids[0].tolist()], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))
    assert again.output_ids == before
    with KVEngineCache(model, press=SnapKVPress(compression_ratio=0.0)) as cache:
        assert cache_generate(cache, ids) == before
    assert hf.config._attn_implementation == "kvengine"


def test_kvpress_argument_names() -> None:
    hf = tiny_model("llama").hf_model
    assert SnapKVPress(compression_ratio=0.5) == SnapKVPress(ratio=0.5)
    assert KVEngineCache(hf, "snapkv", compression_ratio=0.5).press == SnapKVPress(ratio=0.5)
    assert KVEngineCache(hf, "adakv:snapkv", ratio=0.25).press == AdaKV(SnapKVPress(ratio=0.25))
    ids = prompt()
    with KVEngineCache(hf, SnapKVPress(compression_ratio=0.5)) as a:
        first = cache_generate(a, ids)
    with KVEngineCache(hf, "snapkv", compression_ratio=0.5) as b:
        assert cache_generate(b, ids) == first


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"press": "nosuchpress"}, InvalidRequestError, "unknown press 'nosuchpress'.*snapkv"),
        (
            {"press": "snapkv", "ratio": 1.0},
            InvalidRequestError,
            r"compression ratio must be in \[0, 1\), got 1.0",
        ),
        (
            {"press": "knorm", "compression_ratio": -0.1},
            InvalidRequestError,
            r"must be in \[0, 1\), got -0.1",
        ),
        ({"press": "knorm", "ratio": 0.5, "compression_ratio": 0.5}, InvalidRequestError, "not both"),
        ({"press": SnapKVPress(ratio=0.5), "ratio": 0.5}, InvalidRequestError, "give ratio to the press"),
        ({"ratio": 0.5}, InvalidRequestError, "needs a press"),
        ({"press": 0.5}, InvalidRequestError, "press must be a kvengine Press"),
        ({"max_tokens": 0}, InvalidRequestError, "max_tokens must be a positive int"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    hf = tiny_model("llama").hf_model
    with pytest.raises(error, match=match):
        KVEngineCache(hf, **kwargs)
    assert hf.config._attn_implementation == "sdpa"


def test_models_kvengine_cannot_drive() -> None:
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=64)
    with pytest.raises(
        UnsupportedModelError, match=r"no adapter for model_type 'gpt2'.*supported families: llama"
    ):
        KVEngineCache(transformers.GPT2LMHeadModel(config))
    with pytest.raises(InvalidRequestError, match=r"needs a transformers PreTrainedModel.*got str"):
        KVEngineCache("smollm2-135m")  # type: ignore[arg-type]


def test_misuse_is_named() -> None:
    hf = tiny_model("llama").hf_model
    cache = KVEngineCache(hf)
    with pytest.raises(InvalidRequestError, match="inside `with KVEngineCache"):
        cache_generate(cache, prompt(), 2)  # not entered: the model runs its own attention
    with cache, pytest.raises(InvalidRequestError, match="do not nest"), KVEngineCache(hf):
        pass
    assert hf.config._attn_implementation == "sdpa"
    two_layers = PerLayerPress(SnapKVPress(window_size=8), ratios=[0.5, 0.5])
    with (
        pytest.raises(InvalidRequestError, match="2 ratios given but the model has 3 layers"),
        KVEngineCache(hf, two_layers) as c,
    ):
        cache_generate(c, prompt(), 2)
    assert c.pool.bytes_in_use == 0
    small = KVEngineCache(hf, max_tokens=32)
    with pytest.raises(OutOfBlocksError, match=r"holds 32 tokens .*max_tokens"), small:
        cache_generate(small, prompt(40), 2)
    assert small.pool.bytes_in_use == 0
    assert hf.config._attn_implementation == "sdpa"
