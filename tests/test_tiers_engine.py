"""Storage tiers, public prefixes and kept compressed contexts, through the engine.

References: the engine with the prefix cache off (and so transformers, by
test_engine), for every output; the counters of `Engine.stats()` for what was
computed, loaded, stored or rejected. A new `Engine` over the same disk
directory or Redis stands for a restarted or a second process (a test with
real separate processes is in test_tiers_process.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
from conftest import tiny_model
from test_engine import random_prompt

from kvengine.cache import tiered
from kvengine.cache.tiers import DiskTier
from kvengine.config import CacheConfig, SchedulerConfig
from kvengine.engine.engine import Engine
from kvengine.engine.request import SamplingParams
from kvengine.errors import InvalidRequestError
from kvengine.models import LoadedModel
from kvengine.press.registry import press_from_spec

BLOCK = 4
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


def tier_engine(model: LoadedModel, num_blocks: int = 4096, **cache: object) -> Engine:
    per_block = 2 * BLOCK * model.head_dim * 4
    config = CacheConfig(block_size=BLOCK, max_kv_bytes=num_blocks * per_block, prefix_cache=True, **cache)  # type: ignore[arg-type]
    return Engine(model, config, SchedulerConfig(max_step_tokens=256))


def reference(model: LoadedModel, prompt: list[int]) -> list[int]:
    return Engine(model).generate([prompt], PARAMS)[0].output_ids


def generate(engine: Engine, prompt: list[int], salt: str = "") -> tuple[list[int], int]:
    out = engine.generate([prompt], PARAMS, cache_salt=salt)[0]
    engine.check_invariants()
    return out.output_ids, out.num_cached_tokens


def num_chunks(prompt: list[int]) -> int:
    """Whole blocks a finished request leaves cached: its prompt and output, less the last token."""
    return (len(prompt) + PARAMS.max_tokens - 1) // BLOCK


def hit_len(prompt: list[int]) -> int:
    """Tokens a repeat of `prompt` reuses: whole blocks of all but its last token."""
    return (len(prompt) - 1) // BLOCK * BLOCK


def fresh_engine(model: LoadedModel, path: Path, **cache: object) -> Engine:
    return tier_engine(model, tiers="disk", disk_tier_dir=str(path), **cache)


@pytest.mark.parametrize("write", ["through", "back"])
def test_disk_tier_serves_a_restarted_engine(tmp_path: Path, write: str) -> None:
    model = tiny_model("llama")
    prompt = random_prompt(64, 1)
    first = fresh_engine(model, tmp_path, tier_write=write, num_blocks=600)
    expected, _ = generate(first, prompt)
    if write == "back":  # written when evicted from the pool: evict everything
        assert first.prefix is not None
        first.prefix.evict(first.pool.num_blocks)
    first.close()
    assert first.stats()["tier_stored_chunks_total"] == num_chunks(prompt)

    second = fresh_engine(model, tmp_path, tier_write=write)  # a restart: a new index over the directory
    tokens, cached = generate(second, prompt)
    stats = second.stats()
    assert tokens == expected == reference(model, prompt)
    assert cached == hit_len(prompt) == stats["prefix_tier_hit_tokens_total"]
    assert stats["prefill_tokens_total"] == len(prompt) - cached
    second.close()


def test_host_tier_refills_the_pool_after_eviction() -> None:
    model = tiny_model("llama")
    prompt = random_prompt(40, 2)
    engine = tier_engine(model, tiers="host", tier_write="back")
    expected, _ = generate(engine, prompt)
    assert engine.prefix is not None
    engine.prefix.evict(engine.pool.num_blocks)
    assert engine.prefix.tree.num_cached_blocks == 0
    engine.prefix.tiers.flush()  # type: ignore[union-attr]
    tokens, cached = generate(engine, prompt)
    assert tokens == expected and cached == 36
    assert engine.stats()["tier_host_hits_total"] >= 36 // BLOCK
    engine.close()


def _blob_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# What each fault is rejected as: changed bytes break the MAC; an authentic blob in the
# wrong place (another model's, another chunk's) names another key.
FAULT_KINDS = {
    "flip": "unauthenticated",
    "truncate": "unauthenticated",
    "other_model": "mismatch",
    "swap": "mismatch",
}


@pytest.mark.parametrize("fault", list(FAULT_KINDS))
def test_a_bad_block_on_disk_is_recomputed_never_used(tmp_path: Path, fault: str) -> None:
    model = tiny_model("llama")
    prompt = random_prompt(48, 3)
    writer = fresh_engine(model, tmp_path)
    expected, _ = generate(writer, prompt)
    writer.close()
    files = _blob_files(tmp_path)
    assert len(files) == num_chunks(prompt)
    victim = files[len(files) // 2]
    if fault == "flip":
        data = bytearray(victim.read_bytes())
        data[-7] ^= 0x20  # inside the tensor data: only the MAC can tell
        victim.write_bytes(bytes(data))
    elif fault == "truncate":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif fault == "swap":  # every chunk's file holds another chunk's authentic blob
        contents = [f.read_bytes() for f in files]
        for f, data in zip(files, contents[1:] + contents[:1], strict=True):
            f.write_bytes(data)
    else:  # a blob another model wrote, put where this model's chunk is
        other = tiny_model("llama", seed=1)
        other.name = "tiny-other"
        other_dir = tmp_path.parent / "other"
        writer_b = fresh_engine(other, other_dir)
        generate(writer_b, prompt)
        writer_b.close()
        for mine in files:
            mine.write_bytes(_blob_files(other_dir)[0].read_bytes())

    reader = fresh_engine(model, tmp_path)
    tokens, cached = generate(reader, prompt)
    stats = reader.stats()
    assert tokens == expected
    assert stats[f"tier_faults_{FAULT_KINDS[fault]}_total"] >= 1
    assert cached < hit_len(prompt) and stats["prefill_tokens_total"] > len(prompt) - hit_len(prompt)
    reader.close()
    # The bad blob was discarded: a third engine neither trips on it nor counts a fault.
    third = fresh_engine(model, tmp_path)
    assert generate(third, prompt)[0] == expected
    assert not any(k.startswith("tier_faults") for k in third.stats())


def test_tenants_share_only_what_is_public(tmp_path: Path) -> None:
    model = tiny_model("llama")
    system = random_prompt(32, 4)
    engine = tier_engine(model)
    a = system + random_prompt(12, 5)
    b = system + random_prompt(12, 6)
    generate(engine, a, salt="tenant-a")
    assert generate(engine, a, salt="tenant-b")[1] == 0  # same prompt, other tenant: nothing
    assert generate(engine, a, salt="tenant-a")[1] == 40  # same tenant: all whole blocks
    engine.add_public_prefix(system)
    generate(engine, a, salt="tenant-a")
    tokens, cached = generate(engine, b, salt="tenant-b")
    assert cached == 32 and tokens == reference(model, b)  # only the public blocks
    tokens, cached = generate(engine, a, salt="tenant-b")
    assert cached == 32  # tenant a's continuation stays its own
    assert generate(engine, a, salt="tenant-a")[1] == 40
    with pytest.raises(InvalidRequestError, match="prefix cache"):
        Engine(model).add_public_prefix(system)


def _ask(engine: Engine, context: list[int], question: list[int], ratio: float) -> tuple[list[int], int]:
    press = press_from_spec("knorm", ratio)
    seq_id = engine.add_request(context + question, PARAMS, press=press, context_len=len(context))
    while engine.has_unfinished():
        engine.step()
        engine.check_invariants()
    seq = engine.release(seq_id)
    assert seq.finish_reason == "length", engine.step_errors
    return seq.output_ids, seq.num_cached_tokens


def test_a_compressed_context_is_kept_once_and_reused(tmp_path: Path) -> None:
    model = tiny_model("llama")
    context, question = random_prompt(64, 7), random_prompt(6, 8)
    engine = fresh_engine(model, tmp_path)
    first, cached = _ask(engine, context, question, 0.5)
    assert cached == 0 and engine.stats()["compressions_total"] == 1
    prefill = engine.stats()["prefill_tokens_total"]
    second, cached = _ask(engine, context, question, 0.5)
    stats = engine.stats()
    assert second == first and cached == len(context)
    assert stats["compressions_total"] == 1 and stats["compressed_prefix_hits_total"] == 1
    assert stats["prefill_tokens_total"] - prefill == len(question)
    # Another press or ratio is another entry.
    _ask(engine, context, question, 0.25)
    assert engine.stats()["compressions_total"] == 2
    # The kept entry holds the compressed size, and so does its blob.
    assert engine.prefix is not None
    entry = next(iter(engine.prefix.compressed.entries.values()))
    held = engine.cache.bytes_held(entry)
    assert held <= 0.5 * engine.cache.blocks_for_tokens(64) * engine.pool.bytes_per_block + 6 * 48 * 4
    engine.close()
    entries = [
        t for t in map(safetensors.torch.load, map(Path.read_bytes, _blob_files(tmp_path))) if "table" in t
    ]
    assert len(entries) == 2
    assert held in [t["k"].nbytes + t["v"].nbytes for t in entries]

    restarted = fresh_engine(model, tmp_path)
    third, cached = _ask(restarted, context, question, 0.5)
    assert third == first and cached == len(context)
    assert restarted.stats()["compressions_total"] == 0
    restarted.close()


def test_kept_compressed_contexts_are_evicted_when_the_pool_is_short() -> None:
    model = tiny_model("llama")
    engine = tier_engine(model, num_blocks=6 * 40)
    for seed in range(6):
        _ask(engine, random_prompt(64, 20 + seed), random_prompt(4, 9), 0.5)
    stats = engine.stats()
    assert stats["compressed_prefix_evictions_total"] >= 1
    assert stats["compressed_prefix_entries"] >= 1


def test_tier_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown tier 'tape'.*host, disk, redis"):
        CacheConfig(prefix_cache=True, tiers="host,tape")
    with pytest.raises(InvalidRequestError, match="prefix_cache"):
        CacheConfig(tiers="disk")
    with pytest.raises(InvalidRequestError, match="tier_write"):
        CacheConfig(prefix_cache=True, tiers="disk", tier_write="sideways")
    assert isinstance(DiskTier(tmp_path, 1 << 20), DiskTier)


# ---- read-ahead -----------------------------------------------------------------------


def _in_tier_only(engine: Engine, prompts: list[list[int]]) -> None:
    """Run `prompts` and evict them from the pool: their chunks are then in the tiers only."""
    for prompt in prompts:
        generate(engine, prompt)
    assert engine.prefix is not None and engine.prefix.tiers is not None
    engine.prefix.tiers.flush()
    engine.prefix.evict(engine.pool.num_blocks)


def _staged_after_reads(engine: Engine) -> float:
    assert engine.prefix is not None and engine.prefix.tiers is not None
    engine.prefix.tiers.drain()
    return engine.stats()["tier_staged_chunks"]


def test_read_ahead_for_requests_aborted_while_waiting_is_released() -> None:
    model = tiny_model("llama")
    prompts = [random_prompt(40, 40 + i) for i in range(3)]
    engine = tier_engine(model, tiers="host")
    _in_tier_only(engine, prompts)
    # Each prompt twice (two requests share its staged chunks); one is aborted before its reads ran.
    ids = [engine.add_request(p, PARAMS) for p in prompts + prompts]
    engine.abort(ids.pop())
    assert _staged_after_reads(engine) == 3 * hit_len(prompts[0]) // BLOCK  # each prompt's chunks, once
    for seq_id in ids:
        engine.abort(seq_id)
    assert _staged_after_reads(engine) == 0
    engine.check_invariants()
    # Nothing was lost: the next request still loads its prefix from the tier.
    tokens, cached = generate(engine, prompts[0])
    assert tokens == reference(model, prompts[0]) and cached == hit_len(prompts[0])
    assert _staged_after_reads(engine) == 0
    engine.close()


def test_read_ahead_goes_on_when_the_staged_store_is_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiered, "MAX_STAGED", 5)
    model = tiny_model("llama")
    first, second = random_prompt(40, 50), random_prompt(40, 51)
    engine = tier_engine(model, tiers="host")
    _in_tier_only(engine, [first, second])
    waiting = engine.add_request(first, PARAMS)
    assert _staged_after_reads(engine) == 5  # the store is full of the first request's chunks
    loaded = engine.stats()["tier_loaded_chunks_total"]
    running = engine.add_request(second, PARAMS)
    assert _staged_after_reads(engine) == 5
    stats = engine.stats()
    assert stats["tier_loaded_chunks_total"] - loaded == 5  # it read ahead for the second one too
    assert stats["tier_staged_dropped_total"] == 5  # in place of the first one's oldest
    engine.abort(waiting)
    while engine.has_unfinished():
        engine.step()
    seq = engine.release(running)
    assert seq.output_ids == reference(model, second) and seq.num_cached_tokens == hit_len(second)
    assert _staged_after_reads(engine) == 0
    engine.close()
